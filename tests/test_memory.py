"""Stats over a long sequence stay O(N) per layer: a regression test against materialized attention.

Peak memory is measured in a fresh subprocess (ru_maxrss, CPU) so other tests do not pollute it.
One fp32 attention matrix of one layer of this model at 8k tokens is 4 heads x 8192^2 x 4 B =
1 GiB; the chunked reference must stay far below that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    import headlab
    from tests.conftest import build_tiny
    model = headlab.load_model(build_tiny("llama", __import__("pathlib").Path(sys.argv[1])))
    n = 8192
    ids = torch.randint(3, 90, (1, n))
    request = headlab.StatsRequest(argmax=True, entropy=True, received=True, spans={"first": [0], "mid": (4000, 4100)})
    plan = headlab.InterventionPlan().scale_first_token({(0, 1): 2.0}).act([(1, 2)])
    model(ids[:, :16])  # warm up allocator and lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with model.patched(plan, request) as rec:
        model(ids)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_increase_mib": (after - before) / 1024, "shape": list(rec.stats.argmax.shape),
                      "received_keys": rec.stats.received.shape[-1]}))
    """
)


def test_long_sequence_stats_memory_is_linear(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).parents[1])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 1, 4, 8192]
    assert result["received_keys"] == 8192
    one_layer_quadratic_mib = 4 * 8192 * 8192 * 4 / 2**20  # 1024 MiB
    assert result["peak_increase_mib"] < one_layer_quadratic_mib / 3, result


ANALYSIS_SCRIPT = textwrap.dedent(
    """
    import json, random, resource, sys
    import headlab
    from headlab.analyses import retrieval, select_copy, sinks
    from headlab.zoo import tasks
    which, n = sys.argv[1], 8000
    model = headlab.load_model("zoo:mcqa-planted" if which == "select_copy" else "zoo:tasks-llama")
    rng = random.Random(0)
    filler = " ".join(rng.choice(tasks.FILLER) for _ in range(n))
    model(model.tokenize("the river")["input_ids"])  # warm up allocator and lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if which == "retrieval":
        sample = retrieval.zoo_dataset(lengths=[n], depths=[0.5], per_cell=1)[0]
        scores, record = retrieval.sample_scores(model, sample, retrieval.RetrievalConfig(max_new_tokens=3))
        tokens = record["prompt_tokens"]
    elif which == "sinks":
        found = sinks._text_findings(model, 0, filler, headlab.StatsRequest(received=True, spans={"first": [0]}),
                                     sinks.SinksConfig(max_tokens=2 * n))
        tokens = n + 1
    else:
        sample = select_copy.MCQASample(filler + " which is a fruit ?", ("saw", "lemon", "plane", "mouse"), 1)
        reading = select_copy.read_sample(model, sample, select_copy.SelectCopyConfig(format=select_copy.ZOO_FORMAT))
        tokens = n
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_increase_mib": (after - before) / 1024, "tokens": tokens,
                      "heads": model.spec.n_heads}))
    """
)


@pytest.mark.parametrize("analysis", ["retrieval", "sinks", "select_copy"])
def test_each_analysis_on_8k_tokens_stays_linear(analysis):
    """An analysis that silently fell back to materialized attention would need >= one N x N matrix per layer."""
    out = subprocess.run([sys.executable, "-c", ANALYSIS_SCRIPT, analysis], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).parents[1])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] >= 8000
    one_layer_quadratic_mib = result["heads"] * result["tokens"] ** 2 * 4 / 2**20  # fp32 probabilities of one layer
    assert result["peak_increase_mib"] < one_layer_quadratic_mib / 3, result
