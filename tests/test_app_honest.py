"""The head explorer's honesty and robustness (issue 23): ties drawn as ties, signed scores on a
diverging scale, unmeasured heads grey and never masked, one bad run folder = one flagged row,
models loaded only on request and only local ones, the Host header checked, the playground
refusing a mask of another model. Library parts run without a browser; pages in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
import torch

from headlab import HeadScores
from headlab.compare import compare, is_constant, jaccard_topk, top_set
from headlab.runs import Run, RunStore

L, H = 4, 8


def _scores(values, analysis="x", model="zoo:tasks-llama", counts=None) -> HeadScores:
    v = torch.as_tensor(values, dtype=torch.float64).view(L, H)
    return HeadScores(sums=v * (1 if counts is None else counts), counts=torch.ones(L, H, dtype=torch.float64)
                      if counts is None else counts, analysis=analysis, model=model)


# ---- library: honest numbers ---------------------------------------------------------------------


def test_ties_share_their_rank_and_unmeasured_heads_are_never_masked():
    v = torch.zeros(L * H)
    v[3], v[5], v[7] = 2.0, 1.0, 1.0
    counts = torch.ones(L, H, dtype=torch.float64)
    counts[3, 7] = 0  # never measured
    s = _scores(v, counts=counts)
    r = s.tied_ranks()
    assert int(r[0, 3]) == 1 and int(r[0, 5]) == int(r[0, 7]) == 2 and int(r[0, 0]) == 4  # 1, 2, 2, 4
    assert int(r[3, 7]) == 0  # unmeasured: no rank
    assert (3, 7) not in s.to_mask(top_k=L * H).heads and len(s.to_mask(top_k=L * H)) == L * H - 1
    fig = s.plot()
    trace = fig.data[0]
    assert trace.z[3][7] is None and trace.customdata[3][7][0] == "not measured"
    assert trace.customdata[0][5][0] == trace.customdata[0][7][0] == "2 of 31"
    assert trace.colorbar.title.text == "x"


def test_signed_scores_get_a_diverging_scale_and_constant_scores_say_so():
    signed = _scores(torch.linspace(-6, 7.6, L * H), analysis="conflict_effect")
    trace = signed.plot().data[0]
    assert trace.zmid == 0 and trace.colorscale[0][1] != trace.colorscale[-1][1]
    positive = _scores(torch.linspace(0, 1, L * H))
    assert positive.plot().data[0].zmid is None
    zeros = _scores(torch.zeros(L * H))
    assert "every measured head scores 0" in zeros.plot().layout.title.text


def test_compare_does_not_invent_agreement_between_constant_scores():
    a, b = _scores(torch.zeros(L * H), "a"), _scores(torch.zeros(L * H), "b")
    assert is_constant(a) and math.isnan(jaccard_topk(a, b, 5))
    row = compare([a, b], k=5).iloc[0]
    assert math.isnan(row["jaccard_topk"]) and math.isnan(row["spearman"]) and row["shared_topk"] is None
    assert "nothing to rank" in row["note"]
    # ties at the k-th place all enter the top-k set
    v = torch.zeros(L * H)
    v[0], v[1], v[2] = 3.0, 1.0, 1.0
    assert top_set(_scores(v), 2) == {(0, 0), (0, 1), (0, 2)}


# ---- library: a runs directory with bad folders -------------------------------------------------


def _good_run(root: Path, run_id: str, scores: HeadScores | None = None) -> Path:
    with Run(root, "sinks", "zoo:tasks-llama", {"n": 1}, run_id=run_id) as run:
        run.save_scores(scores or _scores(torch.rand(L * H)), "first_token_mass")
        run.save_examples([{"text": "the code of k1 is v1 v2 .", "label": "ex"}])
    return root / run_id


def bad_runs(root: Path) -> dict[str, str]:
    """One good run and one of each kind of bad folder; {kind: run id}."""
    _good_run(root, "good")
    (root / "listjson").mkdir()
    (root / "listjson" / "manifest.json").write_text("[1, 2, 3]")
    wrong = _good_run(root, "wrongtypes")
    m = json.loads((wrong / "manifest.json").read_text())
    m["params"], m["started"] = 1.0, 5
    (wrong / "manifest.json").write_text(json.dumps(m))
    corrupt = _good_run(root, "corruptscores")
    (corrupt / "first_token_mass.safetensors").write_bytes(b"\x00" * 40)  # half-copied
    examples = _good_run(root, "badexamples")
    for f in examples.glob("examples*.json"):
        f.write_text("{not json")
    return {"good": "good", "list": "listjson", "types": "wrongtypes", "scores": "corruptscores", "examples": "badexamples"}


def test_runstore_flags_bad_folders_and_keeps_the_rest(tmp_path):
    runs = bad_runs(tmp_path)
    store = RunStore(tmp_path)
    rows = {r["id"]: r for r in store.table()}
    assert set(rows) == set(runs.values())
    for kind in ("list", "types"):
        assert rows[runs[kind]]["status"] == "unreadable" and "manifest" in rows[runs[kind]]["problem"]
    assert str(tmp_path) not in rows[runs["list"]]["problem"]  # the page shows <runs>, not the server's path
    assert rows[runs["good"]]["status"] == "finished" and rows[runs["good"]]["problem"] == ""
    assert store.score_names(runs["scores"]) == ["first_token_mass"]
    with pytest.raises(Exception, match="first_token_mass"):
        store.score(runs["scores"], "first_token_mass")


# ---- pages in the browser -------------------------------------------------------------------------


browser_mod = pytest.importorskip("tests.test_app_browser")
from selenium.webdriver.common.by import By  # noqa: E402

browser = browser_mod.browser
downloads = browser_mod.downloads
wait_for, text_of, page_text, no_tracebacks = (browser_mod.wait_for, browser_mod.text_of, browser_mod.page_text,
                                               browser_mod.no_tracebacks)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("badruns")
    runs = bad_runs(root)
    signed = _good_run(root, "signed", _scores(torch.linspace(-6, 7.6, L * H), "conflict_effect"))
    runs["signed"] = signed.name
    with Run(root, "sinks", "zoo:safety-conflict", {"n": 1}, run_id="othermodel") as run:
        run.save_scores(HeadScores.from_tensor(torch.rand(2, 4), "first_token_mass", model="zoo:safety-conflict"),
                        "first_token_mass")
    runs["other"] = "othermodel"
    with Run(root, "act", "zoo:tasks-llama", {"n": 4}, run_id="intervention") as run:
        run.save_json({"heads": [[1, 2]], "test": {"n": 4, "accuracy_before": 0.5, "accuracy_after": 0.75},
                       "evaluation": {"harmful": {"refusal_before": 1.0, "refusal_after": 0.25,
                                                  "refusal_random": [1.0, 0.5]}}}, "summary")
    runs["intervention"] = "intervention"
    for name in ("zeros_a", "zeros_b"):
        with Run(root, "sinks", "zoo:tasks-llama", {"n": 1}, run_id=name) as run:
            run.save_scores(_scores(torch.zeros(L * H), analysis=name), "first_token_mass")
        runs[name] = name
    with Run(root, "sinks", "some-org/some-hub-model", {"n": 1}, run_id="hubmodel") as run:
        run.save_scores(_scores(torch.rand(L * H), model="some-org/some-hub-model"), "first_token_mass")
    runs["hub"] = "hubmodel"
    return root, runs


@pytest.fixture(scope="module")
def bad_server(bad_dir):
    from werkzeug.serving import make_server

    from headlab.app import create_app

    app = create_app(bad_dir[0])
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", app.headlab
    srv.shutdown()
    app.headlab.tasks.shutdown()


def test_bad_run_folders_are_flagged_rows_and_every_page_works(bad_server, bad_dir, browser):
    server, _ = bad_server
    _, runs = bad_dir
    browser.get(server + "/")
    wait_for(browser, lambda d: runs["good"] in text_of(d, "runs-table"), "the good run")
    table = text_of(browser, "runs-table")
    assert runs["list"] in table and runs["types"] in table and table.count("unreadable") >= 2
    for path in ("/heatmap", "/compare", "/playground"):
        browser.get(server + path)
        wait_for(browser, lambda d: d.find_elements(By.TAG_NAME, "h2"), f"the {path} page")
        assert "internal error" not in page_text(browser).lower()
        no_tracebacks(browser)
    # a corrupt score file: that score says so, the page and the rest stay
    browser.get(server + "/heatmap?" + urlencode({"run": runs["scores"], "score": "first_token_mass"}))
    wait_for(browser, lambda d: "cannot show 'first_token_mass'" in text_of(d, "heatmap-error"), "the corrupt-score message")
    browser.get(server + "/heatmap?" + urlencode({"run": runs["good"], "score": "first_token_mass"}))
    wait_for(browser, lambda d: "of 32 heads" in text_of(d, "heatmap-mask"), "the good run's heatmap")
    # corrupt examples: the head page says so and works on typed text
    browser.get(server + "/head?" + urlencode({"run": runs["examples"], "layer": 0, "head": 0}))
    wait_for(browser, lambda d: "example inputs cannot be read" in text_of(d, "head-examples-problem"), "the examples message")
    no_tracebacks(browser)


def test_signed_heatmap_is_diverging_and_compare_of_constants_says_so(bad_server, bad_dir, browser):
    server, _ = bad_server
    _, runs = bad_dir
    browser.get(server + "/heatmap?" + urlencode({"run": runs["signed"], "score": "first_token_mass"}))
    wait_for(browser, lambda d: "of 32 heads" in text_of(d, "heatmap-mask"), "the heatmap")
    zmid = wait_for(browser, lambda d: d.execute_script(
        "const g = document.querySelector('#heatmap-graph .js-plotly-plot'); return g && g.data ? [g.data[0].zmid] : null;"),
        "the figure")
    assert zmid == [0]


def test_models_load_only_on_request_and_only_local(bad_server, bad_dir, browser):
    server, ctx = bad_server
    _, runs = bad_dir
    assert "some-org/some-hub-model" not in ctx.models.allowed()  # a hub name: not without --allow-hub
    assert "zoo:shapes-llava" in ctx.models.allowed() and "zoo:shapes-llava" not in ctx.models.text_models()
    browser.get(server + "/head?" + urlencode({"run": runs["good"], "layer": 0, "head": 0}))
    wait_for(browser, lambda d: d.find_elements(By.ID, "head-compute"), "the head page")
    assert ctx.models._models == {}  # opening the page loaded nothing
    browser.get(server + "/head?" + urlencode({"run": runs["hub"], "layer": 0, "head": 0}))
    wait_for(browser, lambda d: d.find_elements(By.ID, "head-compute"), "the hub run's head page")
    browser_mod.set_input(browser, "head-text", "the code of k1 is")
    browser.find_element(By.ID, "head-compute").click()
    wait_for(browser, lambda d: "hub names are not loaded by this app" in text_of(d, "head-error")
             or "hub names are not loaded by this app" in page_text(d), "the hub refusal")
    assert ctx.models._models == {}


def test_playground_refuses_a_mask_of_another_model_and_clears_stale_results(bad_server, bad_dir, browser):
    server, _ = bad_server
    _, runs = bad_dir
    source = f"{runs['other']}::first_token_mass"
    browser.get(server + "/playground?" + urlencode({"source": source, "model": "zoo:tasks-llama", "prompt": "the code"}))
    wait_for(browser, lambda d: d.find_elements(By.ID, "pg-run"), "the playground")
    browser.find_element(By.ID, "pg-run").click()
    wait_for(browser, lambda d: "scored on zoo:safety-conflict, not zoo:tasks-llama" in text_of(d, "pg-error"),
             "the other-model refusal")
    assert text_of(browser, "pg-result") == ""
    no_tracebacks(browser)


def test_host_header_is_checked(bad_server):
    server, _ = bad_server
    ok = urllib.request.urlopen(urllib.request.Request(server + "/"), timeout=10)
    assert ok.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(server + "/", headers={"Host": "evil.example:80"}), timeout=10)
    assert err.value.code == 400


def test_80_by_64_heatmap_draws_any_mask_with_exports_on_screen(tmp_path, browser):
    """A 80-layer × 64-head run: a 500-head mask draws and the export buttons are in view."""
    from werkzeug.serving import make_server

    from headlab.app import create_app

    with Run(tmp_path, "sinks", "zoo:tasks-llama", {"n": 1}, run_id="big") as run:
        run.save_scores(HeadScores.from_tensor(torch.rand(80, 64), "first_token_mass", model="zoo:tasks-llama"),
                        "first_token_mass")
    app = create_app(tmp_path)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/heatmap?" + urlencode({"run": "big", "score": "first_token_mass", "k": 500})
        browser.get(url)
        wait_for(browser, lambda d: browser_mod.outlines(d) == 500, "500 outlines")
        button = browser.find_element(By.ID, "export-json")
        top = button.location["y"]
        assert 0 < top < browser.execute_script("return window.innerHeight")
    finally:
        srv.shutdown()
        app.headlab.tasks.shutdown()
    shutil.rmtree(tmp_path / "big", ignore_errors=True)


def test_heatmap_state_lives_in_the_url(bad_server, bad_dir, browser):
    server, _ = bad_server
    _, runs = bad_dir
    browser.get(server + "/heatmap?" + urlencode({"run": runs["good"], "score": "first_token_mass"}))
    wait_for(browser, lambda d: "of 32 heads" in text_of(d, "heatmap-mask"), "the heatmap")
    browser_mod.set_input(browser, "heatmap-k", 7)
    wait_for(browser, lambda d: "k=7" in d.current_url, "k in the URL")
    assert f"run={runs['good']}" in browser.current_url and "score=first_token_mass" in browser.current_url
    browser.get(browser.current_url)  # a reload (or a shared link) shows the same view
    wait_for(browser, lambda d: text_of(d, "heatmap-mask").startswith("7 of 32"), "the same mask after a reload")


def test_run_page_shows_before_and_after(bad_server, bad_dir, browser):
    server, _ = bad_server
    _, runs = bad_dir
    browser.get(server + "/run?" + urlencode({"run": runs["intervention"]}))
    wait_for(browser, lambda d: "test.accuracy" in text_of(d, "run-before-after"), "the before/after table")
    table = text_of(browser, "run-before-after")
    assert "0.5" in table and "0.75" in table and "evaluation.harmful.refusal" in table and "-0.75" in table
    assert "0.75" in table.split("evaluation.harmful.refusal")[1]  # the random heads' mean refusal, beside it
    browser.get(server + "/run?" + urlencode({"run": runs["good"]}))
    wait_for(browser, lambda d: "reports no before / after numbers" in text_of(d, "run-before-after"), "the scoring run's note")
    no_tracebacks(browser)


def test_compare_of_constant_scores_shows_no_agreement(bad_server, bad_dir, browser):
    server, _ = bad_server
    _, runs = bad_dir
    refs = f"{runs['zeros_a']}::first_token_mass,{runs['zeros_b']}::first_token_mass"
    browser.get(server + "/compare?" + urlencode({"scores": refs, "k": 5}))
    wait_for(browser, lambda d: "nothing to rank" in text_of(d, "compare-table"), "the constant-score note")
    table = text_of(browser, "compare-table")
    assert "—" in table and "1.0" not in table.replace("1.0e", "")
    no_tracebacks(browser)
