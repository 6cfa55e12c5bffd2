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
