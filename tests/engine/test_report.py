"""The run report and the console output of `raypipe run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipelines import engine, spec
from pipelines.report import write_report
from pipelines.store import Store

STAGES = """\
  a: {uses: test.sleep, with: {value: 1}}
  b: {uses: test.sleep, needs: [a], with: {value: 2}}
  broken: {uses: test.fail, with: {message: "bad <input> & more"}}
"""


def test_report_has_sections_for_the_run_and_marks_cached_stages(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: r\nstorage: {tmp_path / 'store'}\nstages:\n{STAGES}")
    engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    report = tmp_path / "store" / "runs" / record.run_id / "report.html"
    assert report.is_file(), "every run writes its report"
    text = report.read_text()
    for section in ("id='stages'", "id='timeline'", "id='stage-a'", "id='stage-broken'"):
        assert section in text
    assert text.count("<td>cached</td>") == 2  # a and b were cached in the second run
    assert "bad &lt;input&gt; &amp; more" in text  # errors are escaped, not injected
    assert not re.search(r"src=['\"]https?:", text), "the report must be self-contained"
    assert text.count("data:image/png;base64,") >= 1
    # `raypipe report` writes the same file again.
    report.unlink()
    assert write_report(Store(str(tmp_path / "store")), record.run_id).endswith("report.html")
    assert report.is_file()


def test_run_output_in_a_non_terminal_is_plain_lines(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: r\nstorage: {tmp_path / 'store'}\nstages:\n{STAGES}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_COLOR_PREFIX", None)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "\x1b" not in output and "\r" not in output, "control codes in non-terminal output"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run ") and lines[-1].endswith(": failed")
    assert any(re.match(r"\[\s*[\d.]+s\] a: (started|cached)", line) for line in lines)
    quiet = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(path), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert len(quiet.stdout.strip().splitlines()) == 1, quiet.stdout  # only the outcome
    assert quiet.stdout.startswith("run ") and quiet.stdout.strip().endswith(": failed")
    run_id = quiet.stdout.split()[1].rstrip(":")
    record = json.loads((Path(tmp_path / "store" / "runs" / run_id / "run.json")).read_text())
    assert record["status"] == "failed"
