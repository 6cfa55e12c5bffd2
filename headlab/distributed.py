"""Sharded work on Ray: per-item results computed by Ray tasks, collected into a run's checkpoint.

Every resumable analysis already keeps its per-item results (a sample's copy scores, a head's
Ships) in the run's checkpoint under a stable key, and builds its HeadScores from them. Sharding
reuses exactly that: the keys are split into shards, each shard is one Ray task (one per GPU, or
per CPU worker) that loads the model in its worker and returns {key: value}; the driver appends
each finished shard to the checkpoint, then runs the analysis as usual, which finds every item
done and merges them the same way as an unsharded run — so the scores are equal, not just close.

A worker that dies (killed, out of memory) has its shard retried by Ray (`max_retries`); a driver
that dies leaves the finished shards in the checkpoint, and the resumed run sends only the rest.

    fill_on_ray(cache, keys, work, shards=8, address="auto")  # an existing cluster
    fill_on_ray(cache, keys, work, shards=2, address="local", num_cpus=2)  # a local one

`work(keys) -> {key: value}` must be importable by the workers (a module-level function, or a
functools.partial of one): every worker needs headlab (and the model files) installed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from headlab.errors import HeadlabError

_WORKER_MODELS: dict[tuple[str, str, str], Any] = {}


def worker_model(ref: str, device: str = "auto", dtype: str = "float32") -> Any:
    """The HeadModel `ref`, loaded once per worker process (on its GPU when Ray gave it one)."""
    import torch

    from headlab.model import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (ref, device, dtype)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS[key] = load_model(ref, device=device, dtype=getattr(torch, dtype))
    return _WORKER_MODELS[key]


def shard_keys(keys: Sequence[str], shards: int) -> list[list[str]]:
    """`keys` split into at most `shards` contiguous, nearly equal parts (empty parts dropped)."""
    if shards < 1:
        raise HeadlabError(f"shards must be >= 1, got {shards}")
    n = len(keys)
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return [list(keys[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the [ray] extra is part of [test]
        raise HeadlabError("Ray is not installed: pip install 'headlab[ray]'") from exc
    return ray


def connect(address: str | None = "local", num_cpus: int | None = None) -> Any:
    """Connect to a Ray cluster: "local" starts one on this machine (`num_cpus` workers), "auto"
    finds the running one, "ray://host:10001" or "host:6379" name one. Reuses a live connection."""
    ray = _ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                  "runtime_env": {"env_vars": {k: v for k, v in os.environ.items()
                                                               if k.startswith(("HEADLAB_", "HF_", "TRANSFORMERS_"))}}}
        if address in (None, "local"):
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    return ray


def fill_on_ray(cache: MutableMapping[str, Any], keys: Sequence[str], work: Callable[[list[str]], dict[str, Any]], *,
                shards: int, address: str | None = "local", num_cpus: int | None = None, gpus_per_task: float = 0,
                max_retries: int = 3, progress: bool = True) -> int:
    """Compute every key of `keys` not yet in `cache` on Ray tasks, `shards` of them, and store the
    results in `cache` as each task finishes. Returns how many shards ran."""
    todo = [k for k in keys if k not in cache]
    if not todo:
        return 0
    ray = connect(address, num_cpus)
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=max_retries, retry_exceptions=False)(_run_shard)
    parts = shard_keys(todo, shards)
    pending = {task.remote(work, part): part for part in parts}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="shards on ray", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                part = pending.pop(ref)
                results = ray.get(ref)
                missing = [k for k in part if k not in results]
                if missing:
                    raise HeadlabError(f"a shard returned no result for {missing[:3]}...")
                for k in part:
                    cache[k] = results[k]
                bar.update(len(part))
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return len(parts)


def _run_shard(work: Callable[[list[str]], dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    return work(keys)


def shard_work(fn: Callable[..., dict[str, Any]], *args: Any) -> Callable[[list[str]], dict[str, Any]]:
    """`fn(*args, keys)` as a shard function Ray can ship to its workers (`fn` at module level:
    the analyses define theirs, e.g. `retrieval.shard`, `safety.ships_shard`)."""
    return functools.partial(fn, *args)
