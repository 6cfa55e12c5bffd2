"""Head analyses (installed as `headlab.analyses`).

One module per kind of head, each with the same shape: a config dataclass with the paper's
defaults, `build_dataset`, `score(...)` returning HeadScores (and per-finding tables), and, where
the paper has one, the intervention and its `evaluate`.

Landed: `sinks` (first-token mass, hidden sinks, massive activations), `retrieval` (the
retrieval score by decoding or teacher forcing, and the masking test), `select_copy` (QK- and
attention-score heads for multiple-choice QA), `choice` (closed-choice accuracy, the evaluation
of the next two), `act` (ACT's head search) and `zerotuning` (head-wise first-token scaling).
`safety` (Ships, dataset-level Ships, Sahara, refusal rates), `patching` (path patching to the
logits or to receiver heads) and `conflict` (memory / context heads and PH3); `generate` is their
batched forward / greedy-generation plumbing. `headlab.jobs` runs each as a resumable run
directory (`headlab score ...`, `headlab intervene ...`). Vision analyses are an open issue.
"""
