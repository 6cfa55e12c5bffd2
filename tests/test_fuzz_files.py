"""Property-based tests over every loader of a user file, and kills during every atomic writer.

Loaders: no input — random bytes, random JSON, structurally plausible but wrong files — ends in
anything but a HeadlabError (a clear message), and reading never writes. Writers: a process
SIGKILLed while rewriting a file leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import io as _io
import json
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headlab import HeadMask, HeadScores, InterventionPlan
from headlab.errors import HeadlabError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)
rows = st.lists(scalars, max_size=5)


def _check(load, content: bytes, name: str, extra: dict[str, bytes] | None = None) -> None:
    """Write `content` as `name` (and `extra` files) in a fresh directory, call `load(path)`:
    it returns or raises HeadlabError, and adds no file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        for other, data in (extra or {}).items():
            (root / other).parent.mkdir(parents=True, exist_ok=True)
            (root / other).write_bytes(data)
        before = sorted(p.name for p in root.rglob("*"))
        try:
            load(path)
        except HeadlabError:
            pass
        assert sorted(p.name for p in root.rglob("*")) == before, "a loader wrote a file"


def _jsonl(values) -> bytes:
    return "\n".join(json.dumps(v) for v in values).encode()


def _csv(header, body) -> bytes:
    buf = _io.StringIO()
    import csv

    w = csv.writer(buf)
    w.writerow(header)
    for r in body:
        w.writerow(r)
    return buf.getvalue().encode()


def _dataset_loaders():
    from headlab.analyses import choice, conflict, safety, select_copy

    return [select_copy.build_dataset, choice.build_dataset, conflict.build_dataset,
            lambda path: safety.build_dataset(path=path, column=None)]


DATASET_FIELDS = ["question", "options", "answer", "prompt", "choices", "memory_answer", "context_answer",
                  "corrupted_prompt", "goal", "needle", "image", "text", "label"]
record = st.dictionaries(st.sampled_from(DATASET_FIELDS), json_values, max_size=6)


@FUZZ
@given(content=st.binary(max_size=400) | st.lists(record, max_size=4).map(_jsonl) | st.lists(json_values, max_size=4).map(_jsonl))
def test_jsonl_datasets(content):
    for load in _dataset_loaders():
        _check(lambda p: load(path=p), content, "d.jsonl")


@FUZZ
@given(header=st.lists(st.sampled_from(DATASET_FIELDS) | st.text(max_size=6), max_size=5),
       body=st.lists(st.lists(st.text(max_size=20), max_size=6), max_size=4), raw=st.binary(max_size=200))
def test_csv_datasets(header, body, raw):
    for content in (_csv(header, body), raw):
        for load in _dataset_loaders():
            _check(lambda p: load(path=p), content, "d.csv")


@FUZZ
@given(content=st.binary(max_size=400) | st.text(max_size=300).map(str.encode), needles=st.lists(record, max_size=3).map(_jsonl))
def test_text_lists_haystacks_and_needles(content, needles):
    from headlab.analyses import retrieval, sinks

    _check(lambda p: sinks.build_dataset(path=str(p)), content, "t.txt")
    _check(lambda p: retrieval.build_dataset(p.parent / "n.jsonl", p, lengths=(20,), depths=(0.5,)), content, "h.txt",
           {"n.jsonl": _jsonl([{"needle": "the code is 42 .", "question": "code?", "answer": "42"}])})
    _check(lambda p: retrieval.build_dataset(p, p.parent / "h.txt", lengths=(20,), depths=(0.5,)), needles, "n.jsonl",
           {"h.txt": b"some words to fill the haystack"})


@FUZZ
@given(content=st.binary(max_size=300) | st.lists(record, max_size=3).map(_jsonl), image=st.binary(max_size=300))
def test_pope_files_and_images(content, image):
    from headlab.analyses.vision_heads import image_array, pope_dataset

    _check(lambda p: pope_dataset(p, p.parent / "images"), content, "p.jsonl", {"images/a.png": image})
    _check(image_array, image, "a.png")


plan_entry = st.lists(scalars, min_size=0, max_size=5)
plans = st.fixed_dictionaries({"format": st.sampled_from(["headlab.plan/1", "other", None])}, optional={
    key: st.lists(plan_entry, max_size=3) | json_values
    for key in ("head_scales", "logit_scales", "key_biases", "act", "ablations", "tensors", "model_shape")
} | {"var": st.fixed_dictionaries({}, optional={"heads": st.lists(plan_entry, max_size=2), "sources": rows,
                                                 "targets": rows}) | json_values})


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


tensor_names = st.sampled_from(["sums", "counts", "weights", "mask", "mean.0.0", "patch.1.2", "mean.x", "other"])
tensors = st.dictionaries(tensor_names, st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from(
    [torch.float32, torch.float64, torch.int64, torch.bool, torch.float16])).map(
    lambda t: (torch.rand(t[0], t[1]) * 4 - 1).to(t[2])), max_size=3)
metadata = st.none() | st.dictionaries(st.sampled_from(["headlab", "format", "x"]),
                                       json_values.map(json.dumps) | st.text(max_size=20), max_size=2)


@FUZZ
@given(plan=plans, raw=st.binary(max_size=200), tens=tensors)
def test_plan_files(plan, raw, tens):
    _check(InterventionPlan.load, json.dumps(plan).encode(), "plan.json")
    _check(InterventionPlan.load, raw, "plan.json")
    _check(InterventionPlan.load, json.dumps(plan).encode(), "plan.json", {"plan.safetensors": raw})
    _check(InterventionPlan.load, json.dumps(plan).encode(), "plan.json", {"plan.safetensors": _safetensors(tens, None)})


masks = st.fixed_dictionaries({"format": st.sampled_from(["headlab.mask/1", "x"]), "heads": st.lists(plan_entry, max_size=3) | json_values,
                               "n_layers": scalars, "n_heads": scalars}, optional={"source": json_values})


@FUZZ
@given(mask=masks, raw=st.binary(max_size=200), tens=tensors, meta=metadata)
def test_mask_and_score_files(mask, raw, tens, meta):
    _check(HeadMask.load, json.dumps(mask).encode(), "m.json")
    _check(HeadMask.load, raw, "m.json")
    for content in (raw, _safetensors(tens, meta)):
        _check(HeadMask.load, content, "m.safetensors")
        _check(HeadScores.load, content, "s.safetensors")


@FUZZ
@given(manifest=json_values | st.fixed_dictionaries({"format": st.just("headlab.run/1")}, optional={
    k: json_values for k in ("id", "analysis", "model", "params", "status", "files", "pid", "host", "started")}),
       raw=st.binary(max_size=200))
def test_manifests_and_the_run_store(manifest, raw):
    from headlab.runs import RunStore, read_manifest

    for content in (json.dumps(manifest).encode(), raw):
        def load(path: Path) -> None:
            try:
                read_manifest(path.parent)
            except HeadlabError:
                pass
            store = RunStore(path.parent.parent)
            store.table()  # one bad run never breaks the listing
            store.scores("r")

        _check(load, content, "r/manifest.json")


# ---- kills during atomic writes ------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    import numpy as np, pandas as pd, torch
    from headlab import io
    from headlab.checkpoint import Checkpoint
    kind, path = sys.argv[1], sys.argv[2]
    N = 600_000
    def write(v):
        if kind == "text":
            io.atomic_write_text(str(v) * N, path)
        elif kind == "json":
            io.atomic_write_json({"v": [v] * (N // 4)}, path)
        elif kind == "safetensors":
            io.atomic_save_safetensors({"t": torch.full((N,), float(v))}, path)
        elif kind == "parquet":
            io.atomic_write_parquet(pd.DataFrame({"v": np.full(N // 4, v)}), path)
        elif kind == "png":
            io.atomic_save_png(np.full((700, 700, 3), 40 * v, dtype=np.uint8), path)
        elif kind == "checkpoint":
            Checkpoint(path)[f"k{v}"] = [v] * (N // 20)
    write(0)
    print("ready", flush=True)
    if sys.argv[3] == "announce":  # say when a finished temp file is about to replace the target
        import os, time
        real = os.replace
        def replace(a, b):
            print("replacing", flush=True)
            time.sleep(0.5)
            real(a, b)
        os.replace = replace
    v = 1
    while True:
        write(v % 2 if kind != "checkpoint" else v)
        v += 1
""")


def _version(kind: str, path: Path) -> set[int]:
    """Which versions the file holds: exactly one for a whole file; raises on a mix or a torn file."""
    import numpy as np
    import pandas as pd

    if kind == "text":
        text = path.read_text()
        assert len(text) == 600_000 and len(set(text)) == 1
        return {int(text[0])}
    if kind == "json":
        values = json.loads(path.read_text())["v"]
        assert len(values) == 150_000
        return set(values)
    if kind == "safetensors":
        from safetensors.torch import load_file

        x = load_file(str(path))["t"]
        assert x.numel() == 600_000
        return set(x.unique().int().tolist())
    if kind == "parquet":
        v = pd.read_parquet(path)["v"]
        assert len(v) == 150_000
        return set(v.unique().tolist())
    if kind == "png":
        from PIL import Image

        a = np.asarray(Image.open(path))
        assert a.shape == (700, 700, 3)
        return set((np.unique(a) // 40).tolist())
    from headlab.checkpoint import Checkpoint

    entries = dict(Checkpoint(path))
    assert entries and all(value == [int(k[1:])] * 30_000 for k, value in entries.items())  # every entry whole
    return {0}


@pytest.mark.parametrize("kind", ["text", "json", "safetensors", "parquet", "png", "checkpoint"])
def test_sigkill_during_a_write_leaves_old_or_new(tmp_path, kind):
    """Attempt 0 kills between a complete temp file and its rename (the old version must be there);
    the others at random moments of a loop that rewrites the file (mostly mid-write)."""
    rng = random.Random(kind)
    for attempt in range(3):
        path = tmp_path / f"{attempt}.{kind}"
        at_rename = attempt == 0 and kind != "checkpoint"  # the checkpoint appends; it renames nothing
        proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path), "announce" if at_rename else "-"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            if at_rename:
                assert proc.stdout.readline().strip() == "replacing"
            else:
                time.sleep(rng.uniform(0.02, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        versions = _version(kind, path)
        assert len(versions) == 1, f"{kind}: a mix of two versions after a kill"
        if at_rename:
            assert versions == {0} and list(tmp_path.glob(f".{path.name}.*.tmp")), "killed before the rename: the old file"
