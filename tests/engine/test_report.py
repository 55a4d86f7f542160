"""The run report and the console output of `raypipe run`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import RAY_WORKER_LINE

from pipelines import engine, spec
from pipelines.record import StageEntry, Status
from pipelines.report import render, write_report
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
    # Self-contained: no element loads anything (the inlined Plotly bundle mentions map tile
    # servers, used only by map traces, which the report has none of).
    markup = re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"(src|href)=['\"]https?:", markup), "the report must be self-contained"
    assert "<script src" not in text
    assert "Plotly.newPlot" in text and "plotly.js (basic - minified) v" in text  # inlined
    # The graph: a node per stage (cached ones marked), an edge per need; stages in their
    # dependency order, not the record's (alphabetical) one.
    nodes = re.findall(r"data-stage='(\w+)' data-state='(\w+)' data-cached='(\w+)'", text)
    assert sorted(nodes) == [
        ("a", "succeeded", "true"),
        ("b", "succeeded", "true"),
        ("broken", "failed", "false"),
    ]
    assert text.count("class='edge'") == 1
    assert text.index("id='stage-a'") < text.index("id='stage-b'") < text.index("id='stage-broken'")
    # `raypipe report` writes the same file again.
    report.unlink()
    assert write_report(Store(str(tmp_path / "store")), record.run_id).endswith("report.html")
    assert report.is_file()


def test_run_output_in_a_non_terminal_is_plain_lines(tmp_path):
    path = tmp_path / "p.yaml"
    chatty = '  chatty: {uses: test.sleep, with: {say: "a library talking"}}\n'
    path.write_text(f"name: r\nstorage: {tmp_path / 'store'}\nstages:\n{STAGES}{chatty}")
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
    # Ray's own output stays in its log files, as in a terminal; the path is said once.
    assert not [line for line in output.splitlines() if RAY_WORKER_LINE.search(line)], output
    assert "a library talking" not in output
    assert sum("Ray's own output: " in line for line in lines) == 1
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


def _png(path: Path, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), shade).save(path)


def test_report_orders_by_dependency_folds_series_and_says_the_decision(tmp_path):
    """A hand-written record (no Ray): stages kept in name order come out in dependency
    order; a series of sample grids shows first and last; a two-point history is a table; a
    gate's decision is a sentence."""
    store = Store(str(tmp_path / "store"))
    # Artifacts inside the store's artifacts/ folder: a report reads no other.
    gan, gate, agent = (tmp_path / "store" / "artifacts" / n for n in ("gan", "gate", "agent"))
    for epoch in range(6):
        _png(gan / "samples" / f"epoch_{epoch:03d}.png", 40 * epoch)
    history = [{"epoch": e, "train/g_loss": 1.0 / (e + 1), "val/fid": 9.0 - e} for e in range(6)]
    (gan / "history.jsonl").write_text("".join(json.dumps(p) + "\n" for p in history))
    agent.mkdir(parents=True)
    returns = [{"step": 1000 * (i + 1), "eval/return": -900.0 + 100 * i} for i in range(2)]
    (agent / "history.jsonl").write_text("".join(json.dumps(p) + "\n" for p in returns))
    gate.mkdir(parents=True)
    decision = {
        "promoted": True,
        "reason": "val/fid 4.0 vs champion 6.0 (gain +2.0 > 0)",
        "metric": "test/fid",
        "candidate": 4.0,
        "champion": 6.0,
        "champion_version": "3",
        "model": "digits-gan",
        "version": "4",
        "candidate_metrics": {"test/fid": 4.0},
    }
    (gate / "decision.json").write_text(json.dumps(decision))
    done = {"status": Status.SUCCEEDED, "start": 1.0, "end": 2.0}
    record = engine.RunRecord(
        run_id="r1",
        pipeline="p",
        source="p.yaml",
        storage=store.root,
        tracking=None,
        overrides=[],
        force=[],
        stages={  # name order, as records written by sorted JSON kept them
            "agent": StageEntry(uses="rl.ddpg", artifact=str(agent), **done),
            "gan": StageEntry(uses="generative.gan", needs=["z_data"], artifact=str(gan), **done),
            "gate": StageEntry(uses="tune.evaluate", needs=["gan"], artifact=str(gate), **done),
            "z_data": StageEntry(uses="data.prepare", cache_hit=True, **done),
        },
    )
    page = render(record, store)
    sections = re.findall(r"<section id='stage-(\w+)'>", page)
    assert sections == ["agent", "z_data", "gan", "gate"]
    assert page.count("class='edge'") == 2
    assert "data-stage='z_data' data-state='succeeded' data-cached='true'" in page
    shown, folded = page.split("<details>", 1)
    assert "samples/epoch_000.png" in shown and "samples/epoch_005.png" in shown
    assert "samples/epoch_002.png" not in shown and "samples/epoch_002.png" in folded
    assert "4 more of this series" in folded
    figures = json.loads(re.search(r"const FIGURES = (.*?);\n", page).group(1))
    assert {"plot-timeline", "plot-gan-0", "plot-gan-1"} <= set(figures)
    assert not [k for k in figures if k.startswith("plot-agent")]  # two points: a table
    assert "<th>eval/return</th>" in page
    assert (
        "Promoted digits-gan version 4 to champion: test/fid 4 against version 3&#x27;s 6." in page
    )


def test_runs_of_one_pipeline_compare_key_metrics(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    store = Store(str(tmp_path / "store"))
    for run_id, acc in (("20260101-000000-aaaaaa", 0.91), ("20260102-000000-bbbbbb", 0.97)):
        record = engine.RunRecord(
            run_id=run_id,
            pipeline="p",
            source="p.yaml",
            storage=store.root,
            tracking=None,
            overrides=[],
            force=[],
            status="succeeded",
            stages={
                "clf": StageEntry(
                    uses="vision.train",
                    status=Status.SUCCEEDED,
                    metrics={"test/accuracy": acc, "train/samples_per_s": 5.0},
                )
            },
        )
        store.write_run_file(run_id, "run.json", record.to_json())
    other = engine.RunRecord(
        run_id="20260103-000000-cccccc",
        pipeline="other",
        source="o.yaml",
        storage=store.root,
        tracking=None,
        overrides=[],
        force=[],
    )
    store.write_run_file(other.run_id, "run.json", other.to_json())
    result = CliRunner().invoke(app, ["runs", "--storage", store.root, "--pipeline", "p"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "clf:test/accuracy" in lines[0] and "samples_per_s" not in lines[0]
    assert "0.91" in lines[1] and "0.97" in lines[2] and len(lines) == 3


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pty")
def test_run_in_a_terminal_shows_a_live_table_of_stages(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: r\nstorage: {tmp_path / 'store'}\nstages:\n{STAGES}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "120", "TERM": "xterm"}
    command = f"{sys.executable} -m pipelines.cli run {path}"
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],  # a pseudo-terminal, as a user has
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1  # the broken stage fails the run
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stdout)
    assert re.search(r"stage\s+state\s+elapsed\s+latest", screen)
    assert re.search(r"\ba\s+succeeded\s+[\d.]+s", screen)
    assert re.search(r"broken\s+failed\s+[\d.]+s\s+FAILED: RuntimeError", screen)


def test_report_text_escapes_every_unprintable_character_and_keeps_the_rest():
    """What the report shows of a text (``guards.block``) skips its escaping patterns for text
    that is all printable: for every code point, the same as the patterns alone give."""
    from pipelines.guards import _ANSI, _CONTROL_BUT_LINES, _escape, block

    for code in range(0x110000):
        text = f"a{chr(code)}b"
        assert block(text) == _CONTROL_BUT_LINES.sub(_escape, _ANSI.sub("", text)), hex(code)
    assert block("line\n\tnext \x1b[31mred\x1b[0m \u202edone") == "line\n\tnext red \\u202edone"
    assert block("café 東京 ✓") == "café 東京 ✓"
