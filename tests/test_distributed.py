"""Sharded scoring on a local Ray cluster of 2 workers (issue 21): scores equal the single-process
run's, and a worker killed mid-run has its shard retried with equal scores."""

from __future__ import annotations

import json
import os

import pytest
import torch

ray = pytest.importorskip("ray")

from headlab import HeadScores, jobs  # noqa: E402
from headlab.analyses import safety  # noqa: E402
from headlab.checkpoint import Checkpoint  # noqa: E402
from headlab.distributed import connect, fill_on_ray, shard_keys, shard_work  # noqa: E402
from headlab.errors import HeadlabError  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    connect("local", num_cpus=2)
    yield ray
    ray.shutdown()


def test_shard_keys_split_evenly():
    assert shard_keys([str(i) for i in range(7)], 3) == [["0", "1"], ["2", "3", "4"], ["5", "6"]]
    assert shard_keys(["a"], 4) == [["a"]]
    with pytest.raises(HeadlabError, match="shards must be >= 1"):
        shard_keys(["a"], 0)


def _equal_runs(a, b, name, exact=True):
    x, y = HeadScores.load(a / name), HeadScores.load(b / name)
    assert torch.equal(x.counts, y.counts)
    if exact:
        assert torch.equal(x.sums, y.sums)
    else:  # heads batched with other heads than in the single run: float order may differ in the last bits
        torch.testing.assert_close(x.sums, y.sums, rtol=1e-6, atol=1e-9)


def test_sharded_retrieval_and_ships_equal_single_process(cluster, tmp_path):
    kw = dict(lengths=[48], depths=[0.0, 1.0], progress=False)
    single = jobs.run("retrieval", "zoo:tasks-llama", tmp_path / "one", "r", **kw)
    sharded = jobs.run("retrieval", "zoo:tasks-llama", tmp_path / "ray", "r", ray="local", shards=2, **kw)
    _equal_runs(single, sharded, "scores")
    lines = [json.loads(line) for line in (sharded / jobs.CHECKPOINT).read_text().splitlines()]
    assert {e["key"] for e in lines} == {"0", "1", "2", "3"}  # every sample came from a shard
    kw = dict(n=6, max_heads=1, progress=False, method="exact", max_new_tokens=4)
    single = jobs.run("safety", "zoo:safety-conflict", tmp_path / "one", "s", **kw)
    sharded = jobs.run("safety", "zoo:safety-conflict", tmp_path / "ray", "s", ray="local", shards=3, **kw)
    _equal_runs(single, sharded, "ships", exact=False)


def test_a_killed_worker_is_retried_and_the_scores_are_equal(cluster, tmp_path):
    """The first attempt of one shard kills its worker process (os._exit): Ray retries the shard on
    a new worker, and the merged scores equal the single-process ones."""
    model = "zoo:safety-conflict"
    prompts = safety.zoo_dataset(4, True)
    config = safety.SafetyConfig()
    heads = [(l, h) for l in range(2) for h in range(4)]
    marker = tmp_path / "killed-once"
    cache = Checkpoint(tmp_path / "progress.jsonl")
    ran = fill_on_ray(cache, safety.ships_keys(heads), shard_work(_dies_once, str(marker), model, prompts, config),
                      shards=2, address="local", progress=False)
    assert ran == 2 and marker.is_file()  # a worker really died
    from headlab import load_model

    want = safety.ships(load_model(model), prompts, config, progress=False).per_query
    for (l, h), key in zip(heads, safety.ships_keys(heads)):
        torch.testing.assert_close(torch.tensor(cache[key], dtype=torch.float64), want[:, l, h], rtol=1e-6, atol=1e-9)


def _dies_once(marker, ref, prompts, config, keys):
    if "ships:L0H0" in keys and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies mid-shard, as a killed or OOM'd worker would
    return safety.ships_shard(ref, prompts, config, keys)


def test_bad_ray_options_are_refused(tmp_path):
    with pytest.raises(HeadlabError, match="--shards must be at least 1"):
        jobs.run("retrieval", "zoo:tasks-llama", tmp_path, ray="local", shards=0, progress=False)
    with pytest.raises(HeadlabError, match="--ray needs an address"):
        jobs.run("retrieval", "zoo:tasks-llama", tmp_path, ray=" ", progress=False)
    assert not any(tmp_path.iterdir())


def test_load_model_with_a_device_map_keeps_its_placement():
    """device_map= goes to accelerate and the model is not moved afterwards; on one device it equals
    a plain load, plans and stats included (the 2-GPU split is checked on GPUs:
    benchmarks/results/multi_gpu_check_h200x2.json)."""
    from headlab import InterventionPlan, StatsRequest, load_model

    plain = load_model("zoo:tasks-llama")
    mapped = load_model("zoo:tasks-llama", device_map={"": "cpu"})
    assert not mapped.multi_device
    ids = plain.tokenize("the code of k1 is")["input_ids"]
    plan = InterventionPlan().prune_heads([(2, 1)])
    with plain.patched(plan, StatsRequest(entropy=True)) as a:
        want = plain(input_ids=ids).logits
    with mapped.patched(plan, StatsRequest(entropy=True)) as b:
        got = mapped(input_ids=ids).logits
    assert torch.equal(want, got) and torch.equal(a.stats.entropy, b.stats.entropy)
