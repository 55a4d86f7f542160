"""The report of a demo-sized run, opened in headless Chromium (Debian's package)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import cli
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


DUMP = ["--enable-logging=stderr", "--v=0", "--dump-dom"]  # the DOM after scripts ran


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *OFFLINE, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _share(image: Image.Image, rgb: tuple[int, int, int]) -> float:
    """The share of ``image``'s pixels within a few levels of colour ``rgb``."""
    pixels = list(image.convert("RGB").getdata())
    near = sum(1 for p in pixels if all(abs(a - b) <= 6 for a, b in zip(p, rgb, strict=True)))
    return near / len(pixels)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test does)")
def test_demo_sized_report_renders_in_chromium_and_two_runs_compare(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: report-demo\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  prepare: {uses: data.prepare, with: {augment: {copies: 1, rotate: 5}}}\n"
        "  classifier:\n    uses: vision.train\n    needs: [prepare]\n"
        "    with: {epochs: 3, batch_size: 64, width: 8}\n"
        "  summary: {uses: test.sleep, with: {value: 1}}\n"
    )
    first = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert first.ok, first.error
    # A second run: data and classifier come from the cache, the last stage runs again.
    second = engine.run_pipeline(spec.load(path, ["summary.value=2"]), printer=lambda _: None)
    assert second.ok and second.stages["classifier"].cache_hit, second.error
    assert not second.stages["summary"].cache_hit
    report = tmp_path / "store" / "runs" / second.run_id / "report.html"
    profile = tmp_path / "profile"

    dom = _chromium(
        "--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri(), profile=profile
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, f"console messages: {console}"
    page = dom.stdout
    for section in ("graph", "stages", "timeline", "stage-prepare", "stage-classifier"):
        assert f'id="{section}"' in page, section
    # Dependency order (alphabetical would put the classifier first).
    assert page.index('id="stage-prepare"') < page.index('id="stage-classifier"')
    assert "Data accounting" in page and "Curves" in page
    assert 'alt="confusion_matrix.png"' in page
    # Plotly drew the timeline and the curves in the browser: its SVG is in the DOM.
    assert page.count('class="main-svg"') >= 2 * 3, "the timeline and curves were not drawn"

    # A screenshot of the graph: a green node (trained) and a grey dashed one (cached).
    shot = tmp_path / "report.png"
    done = _chromium(
        "--window-size=1200,700", f"--screenshot={shot}", report.as_uri(), profile=profile
    )
    assert done.returncode == 0, done.stderr[-2000:]
    top = Image.open(shot).crop((0, 0, 1200, 400))
    assert _share(top, (0xDC, 0xFC, 0xE7)) > 0.005, "no succeeded (green) node in the graph"
    assert _share(top, (0xE5, 0xE7, 0xEB)) > 0.005, "no cached (grey) node in the graph"

    # `raypipe report --compare` puts the two runs side by side, differences marked.
    store = str(tmp_path / "store")
    compared = cli("report", "--compare", first.run_id, second.run_id, "--storage", store)
    assert compared.returncode == 0, compared.stderr
    page = Path(compared.stdout.strip()).read_text()
    differing = re.findall(r"<tr class='differs'><td>([^<]+)</td>", page)
    assert "config.value" in differing and "state" not in differing, differing
    assert "config.epochs" not in differing and "epochs_run" not in differing, differing
    dom = _chromium(
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        Path(compared.stdout.strip()).as_uri(),
        profile=profile,
    )
    assert dom.returncode == 0 and "CONSOLE" not in dom.stderr, dom.stderr[-2000:]
