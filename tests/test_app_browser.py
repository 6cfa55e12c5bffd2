"""The head explorer driven in headless Chromium: every page loads, a heatmap click opens the head
detail, a comparison matches the library, an exported mask file holds the mask, the playground
matches `compare_plan`, bad input shows a message. Screenshots of each page are saved under the
test's tmp dir (and copied to $HEADLAB_SCREENSHOTS when set — that is how docs/ got its set).

Needs chromium + chromedriver (Debian: `apt-get install chromium chromium-driver`); the tests are
skipped without them unless HEADLAB_REQUIRE_BROWSER=1 (CI sets it, so there they fail instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
import torch

dash = pytest.importorskip("dash")
selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from headlab import HeadMask, HeadScores, load_model  # noqa: E402
from headlab.compare import compare  # noqa: E402
from headlab.headview import head_view  # noqa: E402
from headlab.playground import compare_plan  # noqa: E402
from headlab.runs import Run, RunStore  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("HEADLAB_REQUIRE_BROWSER") == "1":
        pytest.fail("HEADLAB_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed", pytrace=False)
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

MODEL = "zoo:tasks-llama"
WAIT = 60


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    from headlab.analyses.demo import demo_analyses

    from headlab import jobs

    out = tmp_path_factory.mktemp("runs")
    demo_analyses(out, model="tasks-llama")  # the small task model keeps the app tests fast
    jobs.run("vision_heads", "zoo:shapes-llava", out, n=2, max_new_tokens=1, progress=False)
    return out


@pytest.fixture(scope="module")
def served(runs_dir):
    """(base URL, the app's AppContext) of an app served by a threaded server on a free port."""
    from werkzeug.serving import make_server

    from headlab.app import create_app

    app = create_app(runs_dir)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", app.headlab
    srv.shutdown()
    app.headlab.tasks.shutdown()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def store(runs_dir) -> RunStore:
    return RunStore(runs_dir)


def run_of(store: RunStore, analysis: str) -> str:
    return next(m["id"] for m in store.list() if m["analysis"] == analysis)


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception:
        raise AssertionError(f"timed out waiting for {what}; page says: {page_text(driver)[:800]!r}") from None


def page_text(driver) -> str:
    try:
        return driver.find_element(By.ID, "page-content").text
    except Exception:
        return ""


def text_of(driver, element_id: str) -> str:
    found = driver.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def shot(driver, tmp_path: Path, name: str) -> Path:
    """Save a screenshot as a test artifact (and into $HEADLAB_SCREENSHOTS when set)."""
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5000  # a rendered page, not an empty image
    if os.environ.get("HEADLAB_SCREENSHOTS"):
        target = Path(os.environ["HEADLAB_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def no_tracebacks(driver) -> None:
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in text and 'File "' not in text


def set_input(driver, element_id: str, value) -> None:
    box = driver.find_element(By.ID, element_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value))


# ---- runs ------------------------------------------------------------------------------------
def test_runs_page_lists_filters_and_picks_up_new_runs(server, browser, store, runs_dir, tmp_path):
    browser.get(server + "/")
    for m in store.list():
        wait_for(browser, lambda d, i=m["id"]: i in text_of(d, "runs-table"), f"run {m['id']} in the table")
    table = text_of(browser, "runs-table")
    assert "finished" in table and MODEL in table
    shot(browser, tmp_path, "runs")

    # the native filter: only sinks rows remain
    cell = browser.find_element(By.CSS_SELECTOR, 'th.dash-filter[data-dash-column="analysis"] input')
    cell.send_keys("sinks" + Keys.ENTER)
    wait_for(browser, lambda d: run_of(store, "retrieval") not in text_of(d, "runs-table"), "the filter to drop other runs")
    assert run_of(store, "sinks") in text_of(browser, "runs-table")

    # a run written while the page is open appears without a reload
    browser.get(server + "/")
    scores = HeadScores.from_tensor(__import__("torch").rand(4, 8), "late_analysis", model=MODEL)
    with Run(runs_dir, "late_analysis", MODEL, run_id="late-run") as run:
        run.save_scores(scores)
    wait_for(browser, lambda d: "late-run" in text_of(d, "runs-table"), "the new run to appear", timeout=20)
    no_tracebacks(browser)


# ---- heatmap, mask, head detail --------------------------------------------------------------
def outlines(driver) -> int:
    """How many heads the heatmap outlines (the mask is one trace: one closed path per head)."""
    return driver.execute_script(
        "const g = document.querySelector('#heatmap-graph .js-plotly-plot');"
        "if (!g || !g.data) return -1;"
        "const m = g.data.filter(t => t.name === 'mask');"
        "return m.length ? m[0].x.filter(v => v === null).length : 0;")


def click_cell(driver, layer: int, head: int, n_layers: int, n_heads: int) -> None:
    drag = driver.find_element(By.CSS_SELECTOR, "#heatmap-graph .nsewdrag")
    w, h = drag.size["width"], drag.size["height"]
    # layer 0 is the top row (reversed y axis); offsets are from the element's centre
    x = (head + 0.5) / n_heads * w - w / 2
    y = (layer + 0.5) / n_layers * h - h / 2
    ActionChains(driver).move_to_element_with_offset(drag, int(x), int(y)).click().perform()


def test_heatmap_mask_and_click_to_head_detail(server, browser, store, model, tmp_path):
    run = run_of(store, "retrieval")
    scores = store.score(run, "scores")
    browser.get(server + "/heatmap?" + urlencode({"run": run, "score": "scores", "k": 4}))
    expected = scores.to_mask(top_k=4)
    heads = ", ".join(f"L{l}H{h}" for l, h in expected)
    wait_for(browser, lambda d: heads in text_of(d, "heatmap-mask"), "the top-4 mask")
    assert text_of(browser, "heatmap-mask").startswith("4 of 32 heads")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heatmap-graph .heatmaplayer .hm")) == 1, "the heatmap")
    # each masked head is outlined on the heatmap
    wait_for(browser, lambda d: outlines(d) == 4, "4 outlines")
    shot(browser, tmp_path, "heatmap")

    # threshold mode gives the library's threshold mask
    browser.find_element(By.CSS_SELECTOR, "#heatmap-mode input[value='threshold']").click()
    set_input(browser, "heatmap-threshold", 0.05)
    by_threshold = scores.to_mask(threshold=0.05)
    wait_for(browser, lambda d: text_of(d, "heatmap-mask").startswith(f"{len(by_threshold)} of 32"), "the threshold mask")

    layer, head, value = scores.top(1)[0]
    # hovering a cell shows its score, rank and count
    drag = browser.find_element(By.CSS_SELECTOR, "#heatmap-graph .nsewdrag")
    w, h = drag.size["width"], drag.size["height"]
    ActionChains(browser).move_to_element_with_offset(drag, int((head + 0.5) / 8 * w - w / 2),
                                                      int((layer + 0.5) / 4 * h - h / 2)).perform()
    hover = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#heatmap-graph .hoverlayer").text, "the hover label")
    assert f"layer {layer} head {head}" in hover and "rank 1 of 32" in hover  # 1-based, as the head page says
    assert float(re.search(r"score ([-0-9.e]+)", hover).group(1)) == pytest.approx(value, rel=1e-3)
    assert f"count {int(scores.counts[layer, head])}" in hover
    click_cell(browser, layer, head, *scores.shape)
    wait_for(browser, lambda d: "/head" in d.current_url, "the head page after the click")
    query = parse_qs(urlparse(browser.current_url).query)
    assert (int(query["layer"][0]), int(query["head"][0])) == (layer, head)
    wait_for(browser, lambda d: f"Head L{layer}H{head}" in page_text(d), "the head title")
    assert "loads zoo:tasks-llama on first use" in page_text(browser)  # nothing loads before asking
    assert not browser.find_elements(By.ID, "head-token-view")
    browser.find_element(By.ID, "head-compute").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "head-token-view"), "the token view")
    wait_for(browser, lambda d: text_of(d, "head-progress-text") == "done", "the head computation")

    # the page's numbers are the library's: head_view on the run's first example, last query
    example = store.examples(run)[0]
    view = head_view(model, example["text"], layer, head, query=-1, spans=example["spans"])
    rows = browser.find_elements(By.CSS_SELECTOR, "#head-top tbody tr")
    first = [c.text for c in rows[1].find_elements(By.TAG_NAME, "td")]  # row 0 is the header
    pos, tok, prob = view.top(1)[0]
    assert first == [str(pos), tok, f"{round(prob, 4):g}"]
    tokens = browser.find_elements(By.CSS_SELECTOR, "#head-token-view .tok")
    assert [t.text for t in tokens] == view.tokens
    assert "tok-query" in tokens[-1].get_attribute("class")
    needle = example["spans"]["needle"]
    assert all("tok-span" in tokens[p].get_attribute("class") for p in range(*needle))
    # the score distribution over the run's samples is drawn
    assert browser.find_elements(By.CSS_SELECTOR, "#head-hist .bars, #head-hist .trace.bars")
    # every head of the layer from the query (8 rows), and the head's query × key window — the library's numbers
    rows = wait_for(browser, lambda d: d.execute_script(
        "const g = document.querySelector('#head-layer .js-plotly-plot'); return g && g.data ? g.data[0].z : null;"),
        "the layer view")
    assert len(rows) == 8 and rows[head] == pytest.approx(view.row.tolist(), abs=1e-6)
    window = browser.execute_script("return document.querySelector('#head-window .js-plotly-plot').data[0].z")
    torch.testing.assert_close(torch.tensor(window, dtype=torch.float32), view.window_matrix, rtol=0, atol=1e-6)
    shot(browser, tmp_path, "head")

    # another query position recomputes the row
    set_input(browser, "head-query", needle[0] + 2)
    browser.find_element(By.ID, "head-compute").click()
    view2 = head_view(model, example["text"], layer, head, query=needle[0] + 2)
    pos2, tok2, _ = view2.top(1)[0]
    wait_for(browser, lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, "#head-top tbody tr")[1]
                                 .find_elements(By.TAG_NAME, "td")][:2] == [str(pos2), tok2], "the new query's top key")
    no_tracebacks(browser)


def test_export_mask_files(server, browser, store, downloads):
    run = run_of(store, "sinks")
    scores = store.score(run, "first_token_mass")
    expected = scores.to_mask(top_k=3)
    browser.get(server + "/heatmap?" + urlencode({"run": run, "score": "first_token_mass", "k": 3}))
    wait_for(browser, lambda d: text_of(d, "heatmap-mask").startswith("3 of 32"), "the mask")
    # the figure draws after the mask text and moves the buttons down: click once it is in place
    wait_for(browser, lambda d: outlines(d) == 3, "3 outlines")
    stem = f"mask-{run}-first_token_mass"
    for button, suffix in (("export-json", ".json"), ("export-safetensors", ".safetensors"), ("export-duo", ".tsv")):
        browser.find_element(By.ID, button).click()
        target = downloads / (stem + suffix)
        wait_for(browser, lambda d, t=target: t.is_file() and t.stat().st_size > 0, f"the download {target.name}")
    as_json = json.loads((downloads / (stem + ".json")).read_text())
    assert HeadMask.from_dict(as_json).heads == expected.heads
    assert as_json["source"]["top_k"] == 3 and as_json["source"]["analysis"] == "first_token_mass"
    loaded = HeadMask.load(downloads / (stem + ".safetensors"))
    assert set(loaded.heads) == set(expected.heads)
    rows = (downloads / (stem + ".tsv")).read_text().splitlines()
    assert len(rows) == 4 and sum(r.split("\t").count("1") for r in rows) == 3
    for l, h in expected:
        assert rows[l].split("\t")[h] == "1"


# ---- compare ---------------------------------------------------------------------------------
def test_compare_matches_the_library(server, browser, store, tmp_path):
    refs = [f"{run_of(store, 'retrieval')}::scores", f"{run_of(store, 'sinks')}::first_token_mass",
            f"{run_of(store, 'select_copy')}::qk_accuracy"]
    browser.get(server + "/compare?" + urlencode({"scores": ",".join(refs), "k": 5}))
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")) == 4, "the pairwise table")
    expected = compare([store.score(*r.split("::")) for r in refs], k=5,
                       names=["retrieval", "first_token_mass", "qk_accuracy"])
    shown = [[c.text for c in row.find_elements(By.TAG_NAME, "td")]
             for row in browser.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")[1:]]
    for row, want in zip(shown, expected.to_dict("records")):
        assert row[:4] == [want["a"], want["b"], "5", str(want["shared_topk"])]
        assert float(row[4]) == pytest.approx(want["jaccard_topk"], abs=1e-3)
        assert float(row[5]) == pytest.approx(want["spearman"], abs=1e-3)
    # three heatmaps on one colour axis, and the scatter of the first two scores
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-grid .heatmaplayer")) == 3, "three heatmaps")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-scatter .scatterlayer .point")) == 32,
             "one scatter point per head")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#compare-grid .colorbar")) == 1
    shot(browser, tmp_path, "compare")
    no_tracebacks(browser)


# ---- playground ------------------------------------------------------------------------------
def test_playground_matches_compare_plan(server, browser, store, model, tmp_path):
    run = run_of(store, "retrieval")
    scores = store.score(run, "scores")
    prompt = store.examples(run)[0]["text"]
    browser.get(server + "/playground?" + urlencode({"source": f"{run}::scores", "k": 2, "kind": "prune"}))
    wait_for(browser, lambda d: "intervene on 2 of 32 heads" in text_of(d, "pg-mask"), "the mask summary")
    assert browser.find_element(By.ID, "pg-prompt").get_attribute("value") == prompt
    set_input(browser, "pg-max-new", 4)
    browser.find_element(By.ID, "pg-run").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "pg-kl"), "the playground result")
    expected = compare_plan(model, prompt, scores.to_mask(top_k=2).to_plan("prune"), max_new_tokens=4)
    assert f"{expected.kl:.4g} nats" in text_of(browser, "pg-kl")
    assert text_of(browser, "pg-baseline") == (expected.baseline_text or "(nothing)")
    assert text_of(browser, "pg-patched") == (expected.patched_text or "(nothing)")
    assert expected.baseline_text != expected.patched_text  # pruning the top retrieval heads breaks the copy
    assert text_of(browser, "pg-progress-text") == "done"
    shot(browser, tmp_path, "playground")

    # a bad value is a message in the page, and nothing runs
    browser.find_element(By.ID, "pg-kind").click()
    option = wait_for(browser, lambda d: d.find_elements(By.XPATH, "//*[text()='ACT β (sink calibration)']"), "the ACT option")
    option[0].click()
    set_input(browser, "pg-value", 3)
    browser.find_element(By.ID, "pg-run").click()
    wait_for(browser, lambda d: "ACT's β must be in [0, 1]" in text_of(d, "pg-error"), "the β error")
    no_tracebacks(browser)


def test_a_busy_model_does_not_block_the_page(served, browser, store):
    """While another request holds the model, the playground says it waits, the page keeps
    answering (its progress polls are served), and the run completes once the model is free."""
    url, ctx = served
    run = run_of(store, "retrieval")
    holding, release = threading.Event(), threading.Event()

    def hold():
        with ctx.models.use(MODEL):
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(60)
        browser.get(url + "/playground?" + urlencode({"source": f"{run}::scores", "k": 1}))
        wait_for(browser, lambda d: "intervene on 1 of 32" in text_of(d, "pg-mask"), "the page")
        set_input(browser, "pg-max-new", 2)
        browser.find_element(By.ID, "pg-run").click()
        wait_for(browser, lambda d: "busy with another request" in text_of(d, "pg-progress-text"), "the waiting message")
        browser.find_element(By.ID, "nav-compare").click()  # other pages keep working meanwhile
        wait_for(browser, lambda d: "Compare" in page_text(d), "the compare page")
        browser.back()
    finally:
        release.set()
        thread.join()
    browser.get(url + "/playground?" + urlencode({"source": f"{run}::scores", "k": 1}))
    wait_for(browser, lambda d: "intervene on 1 of 32" in text_of(d, "pg-mask"), "the page again")
    set_input(browser, "pg-max-new", 2)
    browser.find_element(By.ID, "pg-run").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "pg-kl"), "the result once the model is free")


def test_head_detail_of_a_vision_run_marks_the_image(server, browser, store, tmp_path):
    run = run_of(store, "vision_heads")
    browser.get(server + "/head?" + urlencode({"run": run, "score": "vhd", "layer": 2, "head": 1}))
    wait_for(browser, lambda d: d.find_elements(By.ID, "head-compute"), "the compute button").__getitem__(0).click()
    wait_for(browser, lambda d: text_of(d, "head-progress-text") == "done", "the head view")
    tokens = browser.find_elements(By.CSS_SELECTOR, "#head-token-view .tok")
    image = [t for t in tokens if "tok-span" in t.get_attribute("class")]
    assert [t.text for t in image] == ["<image>"] * 16
    assert "(span image)" in image[0].get_attribute("title")
    # the image with the query's attention on its 4 × 4 patches, and every head of the layer
    overlay = wait_for(browser, lambda d: d.execute_script(
        "const g = document.querySelector('#head-image .js-plotly-plot');"
        "return g && g.data ? [g.data[0].z.length, g.data[0].z[0].length, g.layout.images.length] : null;"), "the overlay")
    assert overlay == [4, 4, 1]
    assert browser.find_elements(By.CSS_SELECTOR, "#head-layer .heatmaplayer")
    shot(browser, tmp_path, "head_vision")
    no_tracebacks(browser)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("path, message", [
    ("/heatmap?run=..%2F..%2Fetc", "invalid run id"),
    ("/head?run=..%2Fsecret&layer=0&head=0", "invalid run id"),
    ("/head?run={run}&layer=9&head=0", "layer must be in 0..3"),
    ("/head?run={run}&layer=x&head=0", "layer must be a whole number"),
    ("/nowhere", "no page"),
])
def test_bad_urls_show_a_message(server, browser, store, path, message):
    browser.get(server + path.format(run=run_of(store, "retrieval")))
    wait_for(browser, lambda d: message in page_text(d), f"the message {message!r}")
    no_tracebacks(browser)


def test_heatmap_bad_k_and_custom_text(server, browser, store):
    run = run_of(store, "retrieval")
    browser.get(server + "/heatmap?" + urlencode({"run": run, "score": "scores"}))
    wait_for(browser, lambda d: "of 32 heads" in text_of(d, "heatmap-mask"), "the mask")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap-graph .heatmaplayer .hm"), "the heatmap")
    set_input(browser, "heatmap-k", 99)
    wait_for(browser, lambda d: "top-k must be in 0..32" in text_of(d, "heatmap-error"), "the k error")

    browser.get(server + "/head?" + urlencode({"run": run, "layer": 0, "head": 0}))
    wait_for(browser, lambda d: d.find_elements(By.ID, "head-compute"), "the compute button").__getitem__(0).click()
    wait_for(browser, lambda d: text_of(d, "head-progress-text") == "done", "the first view")
    set_input(browser, "head-text", "   ")
    browser.find_element(By.ID, "head-example").click()
    option = wait_for(browser, lambda d: d.find_elements(By.XPATH, "//*[text()='my own text']"), "the custom-text option")
    option[0].click()
    browser.find_element(By.ID, "head-compute").click()
    wait_for(browser, lambda d: "the input text is empty" in text_of(d, "head-error"), "the empty-text error")
    no_tracebacks(browser)


# ---- new run (the form generated from the declarations); last: it adds a run to the shared dir ----
def param_box(driver, name: str):
    found = driver.find_elements(By.XPATH, f"//*[contains(@id, '\"name\":\"{name}\"')]")
    return found[0] if found else None


def test_new_run_form_is_generated_and_starts_a_run(server, browser, store, tmp_path):
    from headlab import registry

    browser.get(server + "/new?" + urlencode({"analysis": "sinks", "model": MODEL}))
    wait_for(browser, lambda d: param_box(d, "tau") is not None, "the sinks form")
    for p in registry.get("sinks").params:  # one field per declared parameter, data files left to the CLI
        assert (param_box(browser, p.name) is None) == (p.role == "file"), p.name
    box = param_box(browser, "n")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys("4")
    before = {m["id"] for m in store.list()}
    browser.find_element(By.ID, "new-start").click()
    link = wait_for(browser, lambda d: d.find_elements(By.ID, "new-run-link"), "the finished run", timeout=120)[0]
    new = [m for m in store.list() if m["id"] not in before]
    assert len(new) == 1 and new[0]["analysis"] == "sinks" and new[0]["params"]["n"] == 4
    assert new[0]["id"] in link.text and store.summary(new[0]["id"])["texts"] == 4
    shot(browser, tmp_path, "new_run")

    # a model of the wrong kind is refused before anything is written
    browser.get(server + "/new?" + urlencode({"analysis": "vision_heads", "model": MODEL}))
    wait_for(browser, lambda d: param_box(d, "max_new_tokens") is not None, "the VHD form")
    browser.find_element(By.ID, "new-start").click()
    wait_for(browser, lambda d: "vision_heads needs a vision-language model" in text_of(d, "new-error"), "the refusal")
    assert len(store.list()) == len(before) + 1
    no_tracebacks(browser)
