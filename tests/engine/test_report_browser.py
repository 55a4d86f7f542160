"""The report of a demo-sized run, opened in headless Chromium (Debian's package)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from PIL import Image

from pipelines import engine, spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that keep Chromium off the network (this machine has none) and quiet.
OFFLINE = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test does)")
def test_demo_sized_report_renders_in_chromium(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: report-demo\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  prepare: {uses: data.prepare, with: {augment: {copies: 1, rotate: 5}}}\n"
        "  classifier:\n    uses: vision.train\n    needs: [prepare]\n"
        "    with: {epochs: 3, batch_size: 64, width: 8}\n"
    )
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.ok, record.error
    report = tmp_path / "store" / "runs" / record.run_id / "report.html"
    profile = tmp_path / "profile"
    base = [CHROMIUM, *OFFLINE, f"--user-data-dir={profile}"]

    dom = subprocess.run(
        [*base, "--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, f"console messages: {console}"
    for section in ("stages", "timeline", "stage-prepare", "stage-classifier"):
        assert f'id="{section}"' in dom.stdout, section
    assert "Data accounting" in dom.stdout and "Curves" in dom.stdout
    assert 'alt="confusion_matrix.png"' in dom.stdout
    assert dom.stdout.count("data:image/png;base64,") >= 4  # timeline, curves, confusion, ...

    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    non_white = sum(histogram[:200]) / sum(histogram)
    assert non_white > 0.02, "the screenshot is blank"
