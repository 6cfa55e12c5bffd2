"""`headlab app`: serves on localhost, on a free port, and explains a missing runs directory."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("dash")


def test_app_serves_on_localhost_and_a_free_port(tmp_path):
    from headlab.runs import Run

    with Run(tmp_path, "x", "m", run_id="one"):
        pass
    proc = subprocess.Popen([sys.executable, "-m", "headlab.cli", "app", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while time.time() < deadline and "http" not in line:
            line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, f"no localhost URL in {line!r}"
        assert int(url.group(1)) > 0
        page = urllib.request.urlopen(url.group(0), timeout=30).read().decode()
        assert "<title>headlab</title>" in page
        # the layout is JSON (no pickle anywhere): the pages and the runs come through callbacks
        layout = urllib.request.urlopen(url.group(0) + "_dash-layout", timeout=30).read().decode()
        assert '"page-content"' in layout
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_app_on_a_missing_directory(tmp_path):
    from typer.testing import CliRunner

    from headlab.cli import app

    result = CliRunner().invoke(app, ["app", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output and "headlab demo" in result.output
