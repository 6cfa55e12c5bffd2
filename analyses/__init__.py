"""Head analyses (installed as `headlab.analyses`).

One module per kind of head — retrieval, sinks, select-and-copy, safety, conflict, vision,
zerotuning — each with `build_dataset`, `score(...) -> HeadScores` and, where the paper has one,
the intervention and its `evaluate`. None has landed yet; the core API they build on is
`headlab.load_model`, `HeadModel.patched`, `InterventionPlan`, `StatsRequest` and `HeadScores`.
"""
