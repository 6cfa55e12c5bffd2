"""Head analyses (installed as `headlab.analyses`).

One module per kind of head, each with the same shape: a config dataclass with the paper's
defaults, `build_dataset`, `score(...)` returning HeadScores (and per-finding tables), where the
paper has one the intervention and its `evaluate`, and its job declared with
`headlab.registry.analysis` — from which the CLI, the job runner, study files and the app's run
form are generated. Importing this package imports every module in it, so each declares itself:
adding an analysis is one module here (plus its tests), listed nowhere else.

`sinks` (first-token mass, hidden sinks, massive activations), `patterns` (previous-token,
duplicate-token, induction), `retrieval` (the retrieval score and the masking test),
`select_copy` (QK- and attention-score heads for multiple-choice QA), `probes` (ITI), `choice`
(closed-choice accuracy, the evaluation of the next two), `act` (ACT's head search),
`zerotuning` (head-wise first-token scaling), `safety` (Ships, Sahara, refusal rates), `patching`
(path patching) and `conflict` (memory / context heads and PH3), `vision_heads` (VHD, VHR),
`visual_sinks` (VAR), `code_tasks` (the real-text model's tasks) and `demo` (`headlab demo`).
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
