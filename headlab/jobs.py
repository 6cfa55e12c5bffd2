"""Analyses as resumable run directories: the job runner behind `headlab score|intervene|evaluate`,
study steps and the app's run form.

Each analysis module declares its job (`headlab.registry.analysis`); a job loads the model, builds
its dataset (a user file, or the zoo's own task for zoo models), runs the analysis with a
`Checkpoint` in the run directory — so an interrupted job started again with the same `run_id`
skips every finished sample or head evaluation — and writes the results atomically: manifest,
scores (safetensors + JSON), per-sample parquet, heatmap figures, a JSON summary and, for
interventions, the calibrated plan. This module holds what every job shares (opening, resuming
and finishing a run; the checks of common options) and `run`, which calls a job by name after
checking its parameters against the declaration. It never imports an analysis.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from headlab import registry
from headlab.checkpoint import Checkpoint
from headlab.errors import HeadlabError, RunLockedError
from headlab.model import HeadModel, load_model
from headlab.runs import MANIFEST, Run, read_manifest

CHECKPOINT = "progress.jsonl"

COMMON_HELP = {
    "ray": "run the per-item work as Ray tasks: local (a cluster on this machine), auto (the running cluster) or "
           "ray://HOST:10001; scores equal the unsharded run's",
    "shards": "with --ray: how many tasks to split the work into",
    "ray_gpus": "with --ray: GPUs per task (1: one task per GPU)",
    "method": "head search: exact (every head) | atp (attribution estimate of every head, then the best verified "
              "exactly) | auto (atp from 512 candidate heads up)",
    "verify": "with atp: heads re-evaluated exactly (the highest estimates; path patching: each end)",
    "screen": "with atp: candidates evaluated exactly (the largest estimated task-loss decrease)",
    "seed": "seed of the calibration / test split and of the random-head control",
    "calibration_fraction": "share of the samples used to calibrate (the rest is the test split)",
}
"""Help of the options several analyses share (their declarations use it)."""
METHODS = ("exact", "atp", "auto")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOAD: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("headlab_job_load", default={})


def load_options(device: str | None = None, dtype: str | None = None) -> dict[str, str]:
    """Where and in what precision a job loads its model ({"device", "dtype"}), checked: a device
    torch knows and this machine has, one of DTYPES. Defaults: cpu, float32."""
    device, dtype = device or "cpu", dtype or "float32"
    if dtype not in DTYPES:
        raise HeadlabError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise HeadlabError(f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise HeadlabError(f"--device {device}: this machine has no CUDA device torch can use")
    return {"device": device, "dtype": dtype}


def run(name: str, model: str, out: str | Path = "runs", run_id: str | None = None, *, progress: bool = True,
        device: str | None = None, dtype: str | None = None, **params: Any) -> Path:
    """Run analysis `name` (a declared name, e.g. "retrieval", "ph3") on `model` as a run directory
    under `out`; its parameters are checked against the declaration first (unknown names, wrong
    types, values outside their choices: a ParamError naming the parameter). The model loads on
    `device` in `dtype` ("float32", "bfloat16", "float16"; default cpu, float32), recorded in the
    run's manifest; a run is resumed only in the dtype it started in. Returns the run's directory.
    An unfinished run called `run_id` is resumed."""
    decl = registry.get(name)
    checked = decl.check(params)
    token = _LOAD.set(load_options(device, dtype))
    try:
        return decl.run(model, out, run_id, progress=progress, **checked)
    finally:
        _LOAD.reset(token)


def checkpoint(run: Run) -> Checkpoint:
    """The run's per-item checkpoint (what a resumed job skips)."""
    return Checkpoint(run.dir / CHECKPOINT)


def earlier_scores(run_dir: str | Path, analysis: str | tuple[str, ...], model: str, name: str) -> Any:
    """Score `name` of the finished run in `run_dir`, which must be a run of `analysis` on `model`
    (an evaluation builds on it); an error names what does not match."""
    from headlab.runs import RunStore

    path = Path(run_dir)
    if not (path / MANIFEST).is_file():
        raise HeadlabError(f"{path} is not a run directory (no {MANIFEST}); give the directory of a finished "
                           f"{analysis} run")
    manifest = read_manifest(path)
    wanted = (analysis,) if isinstance(analysis, str) else analysis
    if manifest.get("analysis") not in wanted:
        raise HeadlabError(f"{path} is a {manifest.get('analysis')} run; this needs a {' or '.join(wanted)} run")
    if manifest.get("model") != model:
        raise HeadlabError(f"{path} scored {manifest.get('model')}, not {model}: its heads do not apply to this model")
    if manifest.get("status") != "finished":
        raise HeadlabError(f"{path} is {manifest.get('status')}, not finished: finish (resume) it first")
    return RunStore(path.parent).score(path.name, name)


def is_zoo_task_model(ref: str) -> bool:
    """A bundled model trained on the synthetic tasks of `headlab.zoo.tasks` (its jobs use those tasks)."""
    from headlab import zoo

    if not ref.startswith("zoo:"):
        return False
    name = ref[4:]
    return (name not in zoo.PACKAGED and not zoo.is_corpus_model(name) and not zoo.is_vision_model(name)
            and (zoo.path(name) / "training.json").is_file())


def is_corpus_model(ref: str) -> bool:
    """A bundled model trained on real text (zoo:pycode-llama): its jobs use the code tasks."""
    from headlab import zoo

    return ref.startswith("zoo:") and zoo.is_corpus_model(ref[4:])


def zoo_task(model: str, task: str) -> bool:
    """True for a zoo model trained on `task` (its training.json lists the tasks)."""
    if not is_zoo_task_model(model):
        return False
    from headlab import zoo
    from headlab.zoo import tasks

    args = json.loads((zoo.path(model[4:]) / "training.json").read_text())["args"]
    return task in args.get("tasks", tasks.TASKS)  # models trained before --tasks existed saw every task


def check_fraction(value: float, option: str = "--calibration-fraction") -> None:
    if not 0.0 < value < 1.0:
        raise HeadlabError(f"{option} must be in (0, 1) (the share of samples used to calibrate), got {value}")


def check_count(value: int, option: str, low: int = 1) -> None:
    if isinstance(value, bool) or value < low:
        raise HeadlabError(f"{option} must be at least {low}, got {value}")


def check_method(method: str, count: int, option: str) -> None:
    """--method and its --verify / --screen count, checked before a run is opened."""
    if method not in ("exact", "atp", "auto"):
        raise HeadlabError(f"--method must be exact, atp or auto, got {method!r}")
    check_count(count, option, low=0 if option == "--verify" else 1)


def check_ray(ray: str | None, shards: int) -> None:
    if ray is not None:
        if not ray.strip():
            raise HeadlabError("--ray needs an address: local (a cluster on this machine), auto (the running one) or "
                               "ray://HOST:10001")
        check_count(shards, "--shards")
        dtype = (_LOAD.get() or {}).get("dtype", "float32")
        if dtype != "float32":  # the workers load their own copy (on their GPU, in float32)
            raise HeadlabError(f"--ray workers load the model in float32; a {dtype} run would merge their float32 "
                               "items with its own: drop --dtype, or run without --ray")


def shard_on_ray(cache: Any, keys: list[str], work: Any, ray: str | None, shards: int, ray_gpus: float,
                 progress: bool) -> None:
    """With --ray: compute the items of `keys` on Ray tasks into the run's checkpoint first."""
    if ray is None:
        return
    from headlab.distributed import fill_on_ray

    fill_on_ray(cache, keys, work, shards=shards, address=ray, gpus_per_task=ray_gpus, progress=progress)


def search_summary(params: dict[str, Any]) -> dict[str, Any]:
    """What a run's summary says of how its heads were searched (method, exact count, estimate error)."""
    return {k: params[k] for k in ("method", "verify", "screen", "verification", "top_token_mass") if k in params}


def open_run(root: str | Path, analysis: str, model: str, params: dict[str, Any], run_id: str | None) -> Run:
    """A new run, or the unfinished run `run_id` to resume (its analysis, model and params must match).

    The run's lock is taken first (RunLockedError if another live process writes that run) and
    the resume checks read the manifest under it, so two processes started with one --run-id can
    neither both run nor mix their results. The caller releases it (`started` does)."""
    params = json.loads(json.dumps(params))  # tuples -> lists, as they read back from the manifest
    load = _LOAD.get() or load_options()
    run = Run(root, analysis, model, params, run_id=run_id)
    while True:
        try:
            run.acquire()
            break
        except RunLockedError:
            if run_id is not None:
                raise
            # an automatic id another process took in the same second: the next free name (it now
            # exists, so each new Run picks a later one)
            run = Run(root, analysis, model, params)
    try:
        if run_id is not None and (run.dir / MANIFEST).is_file():
            old = read_manifest(run.dir)
            if old.get("status") == "finished":
                raise HeadlabError(f"run {run_id!r} already finished; choose another --run-id (or delete {run.dir})")
            for key, new in (("analysis", analysis), ("model", model), ("params", params)):
                if old.get(key) != new:
                    raise HeadlabError(f"cannot resume run {run_id!r}: its {key} was {old.get(key)!r}, now {new!r}; "
                                       "rerun with the same arguments or choose another --run-id")
            old_dtype = (old.get("load") or {}).get("dtype", "float32")
            if old_dtype != load["dtype"]:  # the device may change; the numbers' precision may not
                raise HeadlabError(f"cannot resume run {run_id!r}: it started in {old_dtype}, now {load['dtype']}; "
                                   f"rerun with --dtype {old_dtype} or choose another --run-id")
            run.manifest["resumed"] = int(old.get("resumed", 0) or 0) + 1
    except BaseException:
        run.release()
        raise
    return run


@contextmanager
def started(root: str | Path, analysis: str, model: str, params: dict[str, Any],
            run_id: str | None) -> Iterator[tuple[Run, HeadModel]]:
    """(run, model) for a job's body: the run opened and locked before the model loads (a finished,
    mismatched or busy run fails fast), the run's context entered around the body, and the lock
    released however the job ends."""
    run = open_run(root, analysis, model, params, run_id)
    try:
        load = _LOAD.get() or load_options()
        hm = load_model(model, device=load["device"], dtype=DTYPES[load["dtype"]])
        run.manifest["load"] = load
        with run:
            yield run, hm
    finally:
        run.release()


def finish(run: Run, summary: dict, scores: dict, frame: Any = None) -> Path:
    """Write the scores (and their heatmaps), the per-sample frame and the summary; the run's directory."""
    for name, s in scores.items():
        run.save_scores(s, name)
        run.save_figure(s.plot(), name)
    if frame is not None:
        run.save_samples(frame)
    run.save_json(summary, "summary")
    return run.dir


def random_head_controls(cache: Any, shape: tuple[int, int], chosen: list[tuple[int, int]], draws: int, seed: int,
                         among: list[tuple[int, int]], measure: Any) -> tuple[list[list[tuple[int, int]]], list[Any]]:
    """(the random head sets of `random_head_sets`, `measure(heads)` of each): the control of an
    intervention, every measurement kept in the run's checkpoint `cache` (a resumed run skips it)."""
    from headlab.checkpoint import cached

    sets = random_head_sets(shape, chosen, draws, seed, among=among)
    return sets, [cached(cache, "random:" + ",".join(f"L{l}H{h}" for l, h in heads), lambda heads=heads: measure(heads))
                  for heads in sets]


def random_head_sets(shape: tuple[int, int], chosen: list[tuple[int, int]], draws: int, seed: int,
                     among: list[tuple[int, int]] | None = None) -> list[list[tuple[int, int]]]:
    """`draws` seeded sets of len(chosen) heads drawn from `among` (default: every head) minus the
    chosen ones: the random-head control of an intervention. Empty when nothing was chosen."""
    import random

    pool = among if among is not None else [(l, h) for l in range(shape[0]) for h in range(shape[1])]
    others = [head for head in pool if head not in set(chosen)]
    if not chosen or len(others) < len(chosen):
        return []
    rng = random.Random(seed)
    return [sorted(rng.sample(others, len(chosen))) for _ in range(draws)]
