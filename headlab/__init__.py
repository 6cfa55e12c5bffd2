"""headlab: find, score and intervene on attention heads of transformer models.

    import headlab, torch
    model = headlab.load_model("path/to/model", dtype=torch.float32, device="cpu")
    plan = headlab.InterventionPlan().prune_heads([(3, 5)]).scale_first_token({(1, 2): 1.5})
    stats = headlab.StatsRequest(argmax=True, spans={"needle": (40, 52)}, entropy=True, queries=slice(-8, None))
    with model.patched(plan, stats) as rec:
        out = model(input_ids)
    rec.stats.argmax        # [layers, batch, heads, queries]
"""

from headlab.errors import HeadlabError, ModelNotFoundError, PlanError, UnsupportedArchitectureError
from headlab.mask import HeadMask
from headlab.model import HeadModel, load_model
from headlab.plan import ActSetting, InterventionPlan, LayerPlan
from headlab.scores import HeadScores
from headlab.spec import ModelSpec
from headlab.stats import HeadStats, LayerStats, StatsRequest

__version__ = "0.1.0"

__all__ = [
    "ActSetting", "HeadMask", "HeadModel", "HeadScores", "HeadStats", "HeadlabError", "InterventionPlan",
    "LayerPlan", "LayerStats", "ModelNotFoundError", "ModelSpec", "PlanError", "StatsRequest",
    "UnsupportedArchitectureError", "load_model", "__version__",
]
