"""Head analyses (installed as `headlab.analyses`).

One module per kind of head, each with the same shape: a config dataclass with the paper's
defaults, `build_dataset`, `score(...)` returning HeadScores (and per-finding tables), and, where
the paper has one, the intervention and its `evaluate`.

Landed: `sinks` (first-token mass, hidden sinks, massive activations) and `retrieval` (the
retrieval score by decoding or teacher forcing, and the masking test). The others —
select-and-copy, ZeroTuning, ACT's calibration search, safety, conflict, vision — and the
`headlab score ...` commands are open issues.
"""
