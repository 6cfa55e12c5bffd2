"""Heatmap of an 80-layer × 64-head run with large masks (issue 23): the figure the app builds
(all mask outlines one trace) against one layout shape per masked head (how it was drawn before),
both built and serialized to JSON here in the same run; and, where Chromium is installed, the
time a headless browser takes to open the page, then from typing a new k to showing every outline.

    python benchmarks/app_heatmap.py --out benchmarks/results/app_heatmap_cpu.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import torch

from headlab import HeadScores
from headlab.app import figures
from headlab.runs import Run
from record import emit, header


def per_shape(scores: HeadScores, mask) -> object:
    """The old drawing: one rectangle shape per masked head."""
    fig = scores.plot()
    for layer, head in mask:
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line={"color": figures.MASK_COLOUR, "width": 3})
    return fig


def build_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn().to_json()  # Dash sends the figure as JSON
        best = min(best, time.perf_counter() - t0)
    return round(best, 4)


def wait(driver, count: str, k: int, t0: float) -> None:
    while driver.execute_script(count) != k:
        if time.perf_counter() - t0 > 120:
            raise TimeoutError(f"k={k}: outlines never appeared")
        time.sleep(0.01)


def browser_seconds(ks: list[int]) -> dict[str, float] | str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        return "chromium / chromedriver not installed"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from werkzeug.serving import make_server

    from headlab.app import create_app

    root = Path(tempfile.mkdtemp())
    with Run(root, "sinks", "zoo:tasks-llama", {"n": 1}, run_id="big") as run:
        run.save_scores(HeadScores.from_tensor(torch.rand(80, 64, generator=torch.Generator().manual_seed(0)),
                                               "first_token_mass", model="zoo:tasks-llama"), "first_token_mass")
    app = create_app(root)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    out = {}
    count = ("const g = document.querySelector('#heatmap-graph .js-plotly-plot'); if (!g || !g.data) return -1;"
             "const m = g.data.filter(t => t.name === 'mask'); return m.length ? m[0].x.filter(v => v === null).length : 0;")
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        t0 = time.perf_counter()
        driver.get(f"http://127.0.0.1:{srv.server_port}/heatmap?" + urlencode({"run": "big", "score": "first_token_mass", "k": 5}))
        wait(driver, count, 5, t0)
        out["open_page_k5"] = round(time.perf_counter() - t0, 3)
        for k in ks:  # what a user waits for after typing a new k into the open page
            box = driver.find_element(By.ID, "heatmap-k")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.DELETE)
            t0 = time.perf_counter()
            box.send_keys(str(k))
            wait(driver, count, k, t0)
            out[f"change_k_to_{k}"] = round(time.perf_counter() - t0, 3)
    finally:
        driver.quit()
        srv.shutdown()
        app.headlab.tasks.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    scores = HeadScores.from_tensor(torch.rand(80, 64, generator=torch.Generator().manual_seed(0)), "first_token_mass")
    ks = [5, 500, 727, 80 * 64]
    rows = {}
    for k in ks:
        mask = scores.to_mask(top_k=k)
        one = build_seconds(lambda: figures.heatmap(scores, mask))
        rows[str(k)] = {"one_trace_s": one}
        if k <= 727:  # the old drawing grows quadratically (plotly re-validates every shape); past 727 it takes minutes
            old = build_seconds(lambda: per_shape(scores, mask), repeats=1)
            rows[str(k)].update(shape_per_head_s=old, speedup=round(old / one, 1))
    result = {**header(), "shape": [80, 64], "server_build_and_json": rows,
              "browser_seconds": browser_seconds([500, 727, 80 * 64, 5]),
              "target": "any k on 80x64 in < 1 s", "command": "python benchmarks/app_heatmap.py --out benchmarks/results/app_heatmap_cpu.json"}
    emit(result, args.out)


if __name__ == "__main__":
    main()
