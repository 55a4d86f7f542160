"""The HTML report of a run: one self-contained file (images embedded), written at the end of
every run and by ``raypipe report RUN``.

Sections appear for what the run has: a table and a timeline of the stages (cached ones
marked), the data accounting of data stages, curves of every metric a stage reported per step
(training loss and validation metrics, RL returns, ...), and the images a stage saved (confusion
matrix, sample grids). Plots are made with matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from pipelines.record import RUN_FILE, RunRecord, StageEntry, load_record
from pipelines.store import Store

MAX_IMAGES_PER_STAGE = 6
REPORT_FILE = "report.html"


def write_report(store: Store, run_id: str) -> str:
    """Writes ``runs/<run_id>/report.html``; returns its path (or URI)."""
    record = load_record(store, run_id)
    store.write_run_file(run_id, REPORT_FILE, render(record, store))
    return f"{store.run_dir(run_id)}/{REPORT_FILE}"


def render(record: RunRecord, store: Store) -> str:
    """The report of one run record as an HTML page."""
    parts = [_summary(record), _timeline(record)]
    for name, st in record.stages.items():
        parts.append(_stage_section(name, st, store))
    body = "\n".join(p for p in parts if p)
    title = f"raypipe run {record.run_id} ({record.pipeline})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; font-size: .9em; }}
.succeeded {{ color: #17803d; }} .failed {{ color: #b91c1c; }} .skipped {{ color: #888; }}
.running, .pending {{ color: #a16207; }} img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: .5em; overflow-x: auto; font-size: .8em; }}
</style></head><body>
<h1>{_e(title)}</h1>
{body}
</body></html>
"""


def _summary(record: RunRecord) -> str:
    rows = []
    for name, st in record.stages.items():
        seconds = st.seconds
        took = f"{seconds:.1f}s" if isinstance(seconds, int | float) else ""
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_e(st.uses)}</td>"
            f"<td class='{_e(st.status)}'>{_e(st.status)}</td>"
            f"<td>{'cached' if st.cache_hit else ''}</td><td>{took}</td>"
            f"<td>{_e(_key_metrics(st.metrics))}</td>"
            f"<td>{_e(st.error or '')}</td></tr>"
        )
    status = f"<p>Status: <b class='{_e(record.status)}'>{_e(record.status)}</b>"
    if record.error:
        status += f" — {_e(record.error)}"
    status += f"<br>Storage: <code>{_e(record.storage)}</code>"
    if record.overrides:
        status += f"<br>Overrides: <code>{_e(' '.join(record.overrides))}</code>"
    status += "</p>"
    return (
        f"<section id='stages'><h2>Stages</h2>{status}<table><tr><th>stage</th><th>uses</th>"
        "<th>state</th><th>cache</th><th>time</th><th>key metrics</th><th>error</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _key_metrics(metrics: dict[str, Any], limit: int = 4) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, int | float)][:limit]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)


def _timeline(record: RunRecord) -> str:
    stages = [(n, st) for n, st in record.stages.items() if st.start]
    if not stages:
        return ""
    plt = _pyplot()
    t0 = min(st.start for _, st in stages)
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.4 * len(stages)))
    for i, (name, st) in enumerate(reversed(stages)):
        end = st.end or st.start
        width = max(end - st.start, 0.05)
        color = "#9ca3af" if st.cache_hit else _COLORS.get(st.status, "#a16207")
        ax.barh(i, width, left=st.start - t0, color=color)
        label = f"{name} (cached)" if st.cache_hit else name
        ax.text(st.start - t0, i, " " + label, va="center", fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("seconds since the first stage started")
    ax.set_title("timeline (grey: cached)")
    return f"<section id='timeline'><h2>Timeline</h2>{_figure(fig)}</section>"


_COLORS = {"succeeded": "#2563eb", "failed": "#dc2626", "running": "#d97706"}


def _stage_section(name: str, st: StageEntry, store: Store) -> str:
    artifact = st.artifact
    parts = [f"<section id='stage-{_e(name)}'><h2>{_e(name)} <small>({_e(st.uses)})</small></h2>"]
    metrics = {k: v for k, v in st.metrics.items() if not isinstance(v, list | dict)}
    if metrics:
        parts.append(_table(metrics))
    if st.error:
        parts.append(f"<pre>{_e(st.traceback or st.error)}</pre>")
    path = _local(artifact, store)
    if path is not None:
        dataset = path / "dataset.json"
        if dataset.is_file():
            parts.append(_accounting(json.loads(dataset.read_text())))
        history = path / "history.jsonl"
        if history.is_file():
            parts.append(_curves(history))
        images = sorted(path.rglob("*.png"))
        for image in images[-MAX_IMAGES_PER_STAGE:]:
            data = base64.b64encode(image.read_bytes()).decode()
            rel = image.relative_to(path).as_posix()
            parts.append(
                f"<figure><img alt='{_e(rel)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{_e(rel)}</figcaption></figure>"
            )
        for extra in ("decision.json", "best_config.json", "samples.txt"):
            if (path / extra).is_file():
                parts.append(f"<h3>{extra}</h3><pre>{_e((path / extra).read_text())}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _local(artifact: str | None, store: Store) -> Path | None:
    if not artifact or not store.is_local:
        return None
    path = Path(artifact)
    return path if path.is_dir() else None


def _accounting(dataset: dict[str, Any]) -> str:
    accounting = dataset.get("accounting") or {}
    flat = {k: v for k, v in accounting.items() if not isinstance(v, dict | list)}
    parts = ["<h3>Data accounting</h3>", _table(flat)]
    for key, value in accounting.items():
        if isinstance(value, dict) and value:
            parts.append(f"<h4>{_e(key)}</h4>" + _table(_flatten(value)))
    return "\n".join(parts)


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _curves(history: Path) -> str:
    points = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    keys = sorted(
        {k for p in points for k, v in p.items() if isinstance(v, int | float)}
        - {"time", "step", "epoch"}
    )
    if not points or not keys:
        return ""
    plt = _pyplot()
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    fig, axes = plt.subplots(1, len(groups), figsize=(min(4 * len(groups), 16), 3), squeeze=False)
    for ax, (metric, names) in zip(axes[0], groups.items(), strict=True):
        for name in names:
            xs = [p.get("step", i) for i, p in enumerate(points) if name in p]
            ys = [p[name] for p in points if name in p]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return f"<h3>Curves</h3>{_figure(fig)}"


def _table(values: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(f'{v:.6g}' if isinstance(v, float) else v)}</td></tr>"
        for k, v in values.items()
    )
    return f"<table>{rows}</table>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(fig) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='plot' src='data:image/png;base64,{data}'>"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


__all__ = ["REPORT_FILE", "RUN_FILE", "render", "write_report"]
