"""The HTML report of a run: one self-contained file, written at the end of every run and by
``raypipe report RUN``; ``raypipe report --compare RUN RUN`` writes two runs side by side.

The report opens with the pipeline's graph (stages as nodes, ``needs:`` as edges, coloured by
state, cached stages dashed), then the stages in dependency order: their metrics, the data
accounting of data stages, curves of what a stage reported per step, the images it saved (a
series such as per-epoch sample grids as its first and last, the rest folded away) and a gate's
decision in words. Curves and the timeline are Plotly figures drawn by the browser, values on
hover; Plotly's script is inlined so the file works offline. Nothing here imports a plotting
library: the figures are data, which keeps writing a report fast.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import os
import re
from pathlib import Path
from typing import Any

from pipelines.guards import InputError, TooLarge, block
from pipelines.record import PIPELINE_FILE, RUN_FILE, RunRecord, StageEntry, load_record
from pipelines.spec import MAX_FILE_BYTES, parse_yaml
from pipelines.store import Store

REPORT_FILE = "report.html"
MAX_SERIES_IMAGES = 24  # images of one series kept in a report (evenly spaced)
MIN_CURVE_POINTS = 3  # fewer points per metric: a table says more than a plot

# Fill and stroke by state, shared by the graph, the tables and the timeline.
_STATE_COLORS = {
    "succeeded": ("#dcfce7", "#15803d"),
    "failed": ("#fee2e2", "#b91c1c"),
    "skipped": ("#f3f4f6", "#6b7280"),
    "running": ("#fef3c7", "#b45309"),
    "pending": ("#fef3c7", "#b45309"),
}
_CACHED_COLORS = ("#e5e7eb", "#4b5563")


def write_report(store: Store, run_id: str) -> str:
    """Writes ``runs/<run_id>/report.html``; returns its path (or URI)."""
    record = load_record(store, run_id)
    store.write_run_file(run_id, REPORT_FILE, render_bytes(record, store))
    return f"{store.run_dir(run_id)}/{REPORT_FILE}"


def write_comparison(store: Store, first: str, second: str) -> str:
    """Writes ``runs/<second>/compare-<first>.html``, the two runs' stage configs and metrics
    side by side with differences marked; returns its path (or URI)."""
    records = load_record(store, first), load_record(store, second)
    for record in records:
        _recover_needs(record, store)
    name = f"compare-{first}.html"
    store.write_run_file(second, name, render_comparison(*records))
    return f"{store.run_dir(second)}/{name}"


def render(record: RunRecord, store: Store) -> str:
    """The report of one run record as an HTML page."""
    return render_bytes(record, store).decode()


def render_bytes(record: RunRecord, store: Store) -> bytes:
    """The report of one run record as an HTML page, encoded (UTF-8) as it is written."""
    figures: dict[str, dict[str, Any]] = {}
    _recover_needs(record, store)
    order = stage_order(record)
    parts = [_graph_section(record, order), _summary(record, order), _timeline(record, figures)]
    for name in order:
        parts.append(_stage_section(name, record.stages[name], store, figures))
    title = f"raypipe run {record.run_id} ({record.pipeline})"
    return _page(title, "\n".join(p for p in parts if p), figures)


def stage_order(record: RunRecord) -> list[str]:
    """The record's stages in dependency order: each after all it needs, otherwise in the
    record's own order (the pipeline's, for records that keep it)."""
    done: list[str] = []
    waiting = list(record.stages)
    while waiting:
        ready = [n for n in waiting if all(d in done for d in record.stages[n].needs)]
        # A record naming a stage it does not hold (hand-edited) must not loop for ever.
        name = (ready or waiting)[0]
        done.append(name)
        waiting.remove(name)
    return done


def _recover_needs(record: RunRecord, store: Store) -> None:
    """Records written before stages kept their ``needs`` (and their order) take both from
    the pipeline file saved beside the record."""
    if any(st.needs for st in record.stages.values()):
        return
    try:  # bounded and parsed safely (no alias bomb): the file is as hostile as the record
        text = store.read_run_file(record.run_id, PIPELINE_FILE, limit=MAX_FILE_BYTES)
        stages = (parse_yaml(text or "", PIPELINE_FILE) or {}).get("stages")
    except (InputError, TooLarge, UnicodeDecodeError, AttributeError):
        return
    if not isinstance(stages, dict) or set(stages) != set(record.stages):
        return
    for name, entry in record.stages.items():
        needs = (stages[name] or {}).get("needs") if isinstance(stages[name], dict) else None
        if isinstance(needs, list):
            entry.needs = [str(n) for n in needs]
    record.stages = {name: record.stages[name] for name in stages}


def _page(title: str, body: str, figures: dict[str, dict[str, Any]]) -> bytes:
    """The page, encoded. Plotly's bundle (1.2 MB, not all ASCII) goes in as the bytes read once
    per process: copied into the page's text, it would be encoded again on every report."""
    head = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; font-size: .9em; }}
.succeeded {{ color: #15803d; }} .failed {{ color: #b91c1c; }} .skipped {{ color: #6b7280; }}
.running, .pending {{ color: #b45309; }} img {{ max-width: 100%; }}
.differs {{ background: #fef9c3; }} .missing {{ color: #9ca3af; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 8px; }}
.plot {{ height: 300px; }} .images {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; }} figcaption {{ font-size: .8em; color: #555; }}
pre {{ background: #f6f6f6; padding: .5em; overflow-x: auto; font-size: .8em; }}
.decision {{ font-size: 1.05em; }}
</style></head><body>
<h1>{_e(title)}</h1>
{body}
"""
    end = "</body></html>\n"
    if not figures:
        return (head + "\n" + end).encode()
    # "</" inside a script's JSON would end the script element early.
    data = json.dumps(figures, allow_nan=False, default=str).replace("</", "<\\/")
    draw = (
        f"</script>\n<script>\nconst FIGURES = {data};\n"
        "for (const [id, fig] of Object.entries(FIGURES)) {\n"
        "  Plotly.newPlot(id, fig.data, fig.layout,"
        " {displaylogo: false, responsive: true});\n}\n</script>\n"
    )
    return b"".join(((head + "<script>").encode(), _plotly_js(), (draw + end).encode()))


#: Plotly's basic bundle (scatter, bar and pie traces: the report draws lines and bars), 1.2 MB
#: where the full one the plotly package ships is 4.8 MB; see assets/README.md.
PLOTLY_JS = Path(__file__).parent / "assets" / "plotly-basic.min.js"


@functools.cache
def _plotly_js() -> bytes:
    """Plotly's browser bundle, UTF-8, read once per process."""
    return PLOTLY_JS.read_bytes()


def _summary(record: RunRecord, order: list[str]) -> str:
    rows = []
    for name in order:
        st = record.stages[name]
        seconds = st.seconds
        took = f"{seconds:.1f}s" if isinstance(seconds, int | float) else ""
        rows.append(
            f"<tr><td><a href='#stage-{_e(name)}'>{_e(name)}</a></td><td>{_e(st.uses)}</td>"
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


# The graph's geometry, in SVG user units.
_NODE_W, _NODE_H, _COL_GAP, _ROW_GAP, _PAD = 190, 48, 70, 18, 10


def _graph_section(record: RunRecord, order: list[str]) -> str:
    return (
        "<section id='graph'><h2>Pipeline</h2>"
        + graph_svg(record, order)
        + "<p style='font-size:.85em'>Green: succeeded · red: failed · amber: running or"
        " pending · grey: skipped · dashed: taken from the cache. A node links to its stage."
        "</p></section>"
    )


def graph_svg(record: RunRecord, order: list[str]) -> str:
    """The pipeline as an inline SVG: a column per dependency depth, an arrow per ``needs:``."""
    depth: dict[str, int] = {}
    for name in order:  # dependency order: a stage's needs have their depth already
        needs = [d for d in record.stages[name].needs if d in depth]
        depth[name] = 1 + max((depth[d] for d in needs), default=-1)
    columns: dict[int, list[str]] = {}
    for name in order:
        columns.setdefault(depth[name], []).append(name)
    rows = max(len(c) for c in columns.values())
    height = 2 * _PAD + rows * _NODE_H + (rows - 1) * _ROW_GAP
    width = 2 * _PAD + len(columns) * _NODE_W + (len(columns) - 1) * _COL_GAP
    where: dict[str, tuple[float, float]] = {}
    for col, names in columns.items():
        # A shorter column is centred against the tallest.
        top = _PAD + (rows - len(names)) * (_NODE_H + _ROW_GAP) / 2
        for row, name in enumerate(names):
            where[name] = (_PAD + col * (_NODE_W + _COL_GAP), top + row * (_NODE_H + _ROW_GAP))
    edges = []
    for name in order:
        x2, y2 = where[name]
        for need in record.stages[name].needs:
            if need not in where:
                continue
            x1, y1 = where[need]
            sx, sy, ex, ey = x1 + _NODE_W, y1 + _NODE_H / 2, x2 - 2, y2 + _NODE_H / 2
            mid = (sx + ex) / 2
            edges.append(
                f"<path class='edge' d='M{sx:.0f},{sy:.0f} C{mid:.0f},{sy:.0f} {mid:.0f},{ey:.0f}"
                f" {ex:.0f},{ey:.0f}' fill='none' stroke='#6b7280' stroke-width='1.5'"
                " marker-end='url(#arrow)'/>"
            )
    nodes = []
    for name in order:
        st = record.stages[name]
        x, y = where[name]
        fill, stroke = (
            _CACHED_COLORS if st.cache_hit else _STATE_COLORS.get(st.status, _CACHED_COLORS)
        )
        dash = " stroke-dasharray='5 3'" if st.cache_hit else ""
        second = st.uses + (" · cached" if st.cache_hit else "")
        nodes.append(
            f"<a href='#stage-{_e(name)}'><g class='node' data-stage='{_e(name)}'"
            f" data-state='{_e(st.status)}' data-cached='{str(st.cache_hit).lower()}'>"
            f"<title>{_e(name)} ({_e(st.uses)}): {_e(st.status)}</title>"
            f"<rect x='{x:.0f}' y='{y:.0f}' width='{_NODE_W}' height='{_NODE_H}' rx='8'"
            f" fill='{fill}' stroke='{stroke}' stroke-width='2'{dash}/>"
            f"<text x='{x + 10:.0f}' y='{y + 20:.0f}' font-size='13' font-weight='600'"
            f" fill='#111'>{_e(_clip(name, 24))}</text>"
            f"<text x='{x + 10:.0f}' y='{y + 37:.0f}' font-size='11' fill='{stroke}'>"
            f"{_e(_clip(second, 30))}</text></g></a>"
        )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}'"
        f" viewBox='0 0 {width:.0f} {height:.0f}' role='img' aria-label='pipeline graph'"
        " style='max-width:100%;height:auto;font-family:system-ui,sans-serif'>"
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7'"
        " markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z'"
        " fill='#6b7280'/></marker></defs>" + "".join(edges) + "".join(nodes) + "</svg>"
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timeline(record: RunRecord, figures: dict[str, dict[str, Any]]) -> str:
    stages = [(n, st) for n, st in record.stages.items() if st.start]
    if not stages:
        return ""
    stages.sort(key=lambda item: item[1].start)
    t0 = stages[0][1].start
    names = [f"{n} (cached)" if st.cache_hit else n for n, st in stages]
    figures["plot-timeline"] = {
        "data": [
            {
                "type": "bar",
                "orientation": "h",
                "y": names,
                "base": [round(st.start - t0, 3) for _, st in stages],
                "x": [round(max((st.end or st.start) - st.start, 0.05), 3) for _, st in stages],
                "marker": {"color": [_bar_color(st) for _, st in stages]},
                "hovertemplate": "%{y}: %{base:.1f}s + %{x:.1f}s<extra></extra>",
            }
        ],
        "layout": {
            "height": 80 + 28 * len(stages),
            "margin": {"l": 160, "r": 20, "t": 10, "b": 40},
            "xaxis": {"title": {"text": "seconds since the first stage started"}},
            "yaxis": {"autorange": "reversed"},
        },
    }
    return "<section id='timeline'><h2>Timeline</h2><div id='plot-timeline'></div></section>"


def _bar_color(st: StageEntry) -> str:
    return _CACHED_COLORS[1] if st.cache_hit else _STATE_COLORS.get(st.status, _CACHED_COLORS)[1]


def _stage_section(
    name: str, st: StageEntry, store: Store, figures: dict[str, dict[str, Any]]
) -> str:
    parts = [f"<section id='stage-{_e(name)}'><h2>{_e(name)} <small>({_e(st.uses)})</small></h2>"]
    if st.needs:
        parts.append(f"<p>needs: {', '.join(_e(n) for n in st.needs)}</p>")
    metrics = {k: v for k, v in st.metrics.items() if not isinstance(v, list | dict)}
    if metrics:
        parts.append(_table(metrics))
    if st.error:
        parts.append(f"<pre>{_e(st.traceback or st.error)}</pre>")
    path = _local(st.artifact, store)
    if path is not None:
        names, images = _artifact_files(path)

        def has(file: str) -> bool:  # a file (not a FIFO, not a dangling link): stat only those
            return file in names and (path / file).is_file()

        if has("dataset.json"):
            parts.append(_accounting(json.loads((path / "dataset.json").read_text())))
        if has("history.jsonl"):
            parts.append(_curves(name, path / "history.jsonl", figures))
        parts.append(_images(path, images))
        if has("decision.json"):
            parts.append(_decision(json.loads((path / "decision.json").read_text())))
        if has("best_config.json"):
            best = json.loads((path / "best_config.json").read_text())
            parts.append("<h3>Best config</h3>" + _table(_flatten(best)))
        if has("compression.json"):  # model.compress: the original and its compressed copy
            parts.append(_compression(json.loads((path / "compression.json").read_text())))
        if has("samples.txt"):  # a language model's generated text
            samples = (path / "samples.txt").read_text()[:20_000]
            parts.append(f"<h3>Samples</h3><pre>{_e(samples)}</pre>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _local(artifact: str | None, store: Store) -> Path | None:
    return store.local_artifact(artifact) if artifact else None


def _artifact_files(root: Path) -> tuple[set[str], list[Path]]:
    """The names directly in an artifact's folder that are not folders (no stat each: a folder
    of many shards costs one listing), and its images (``*.png`` at any depth), sorted: one
    walk of the folder (symbolic links to folders not followed)."""
    top: set[str] = set()
    images: list[Path] = []
    for folder, _dirs, names in os.walk(root):
        if folder == str(root):
            top = set(names)
        images.extend(Path(folder, n) for n in names if n.endswith(".png"))
    return top, sorted(images)


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


def _curves(stage: str, history: Path, figures: dict[str, dict[str, Any]]) -> str:
    """A stage's per-step metrics: one interactive plot per metric (train and val of a metric
    share it), or a table when there are too few points for a line to say anything."""
    points = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    keys = sorted(
        {k for p in points for k, v in p.items() if _finite(v)} - {"time", "step", "epoch"}
    )
    if not points or not keys:
        return ""
    x_key = "epoch" if all("epoch" in p for p in points) else "step"
    xs = [p.get(x_key, i) for i, p in enumerate(points)]
    if len(points) < MIN_CURVE_POINTS:
        rows = {
            f"{x_key} {x}": {k: p[k] for k in keys if k in p}
            for x, p in zip(xs, points, strict=True)
        }
        return "<h3>Per-step metrics</h3>" + _grid_table(keys, rows)
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    divs = []
    for i, (metric, names) in enumerate(groups.items()):
        plot_id = f"plot-{_slug(stage)}-{i}"
        traces = []
        for name in names:
            pairs = [(x, p[name]) for x, p in zip(xs, points, strict=True) if _finite(p.get(name))]
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers" if len(pairs) < 60 else "lines",
                    "name": name,
                    "x": [x for x, _ in pairs],
                    "y": [y for _, y in pairs],
                }
            )
        figures[plot_id] = {
            "data": traces,
            "layout": {
                "title": {"text": metric, "font": {"size": 13}},
                "margin": {"l": 50, "r": 10, "t": 36, "b": 40},
                "xaxis": {"title": {"text": x_key}},
                "legend": {"orientation": "h", "y": -0.25},
                "hovermode": "x unified",
            },
        }
        divs.append(f"<div class='plot' id='{plot_id}'></div>")
    return "<h3>Curves</h3><div class='plots'>" + "".join(divs) + "</div>"


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _images(path: Path, images: list[Path]) -> str:
    """The images a stage saved (``images``, under ``path``). A series (names that differ only
    in their numbers, such as per-epoch sample grids) shows its first and last, the rest in a
    details element."""
    series: dict[str, list[Path]] = {}
    for image in images:
        rel = image.relative_to(path).as_posix()
        series.setdefault(re.sub(r"\d+", "#", rel), []).append(image)
    if not series:
        return ""
    parts = ["<h3>Images</h3>"]
    for images in series.values():
        shown = images if len(images) <= 2 else [images[0], images[-1]]
        parts.append("<div class='images'>" + "".join(_img(i, path) for i in shown) + "</div>")
        rest = images[1:-1] if len(images) > 2 else []
        if rest:
            step = max(1, -(-len(rest) // MAX_SERIES_IMAGES))
            kept = rest[::step]
            parts.append(
                f"<details><summary>{len(rest)} more of this series"
                + (f" (every {step}th shown)" if step > 1 else "")
                + "</summary><div class='images'>"
                + "".join(_img(i, path) for i in kept)
                + "</div></details>"
            )
    return "\n".join(parts)


def _img(image: Path, root: Path) -> str:
    data = base64.b64encode(image.read_bytes()).decode()
    rel = image.relative_to(root).as_posix()
    return (
        f"<figure><img alt='{_e(rel)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{_e(rel)}</figcaption></figure>"
    )


def decision_sentence(decision: dict[str, Any]) -> str:
    """A gate's decision in one sentence."""
    metric, candidate = decision.get("metric"), decision.get("candidate")
    model, version = decision.get("model"), decision.get("version")
    champion, before = decision.get("champion"), decision.get("champion_version")
    value = f"{metric} {_num(candidate)}"
    if decision.get("promoted"):
        who = f"{model} version {version}" if model and version else "the candidate"
        if champion is None:
            return f"Promoted {who} to champion: {value}, and there was no champion before."
        return f"Promoted {who} to champion: {value} against version {before}'s {_num(champion)}."
    missed = decision.get("failed_thresholds") or []
    if missed:
        return f"Not promoted: the candidate misses its thresholds ({'; '.join(missed)})."
    keeps = f"version {before}" if before else "the champion"
    return (
        f"Not promoted: {value} against {keeps}'s {_num(champion)} is not better by the"
        f" margin required; {keeps} stays champion."
    )


def _decision(decision: dict[str, Any]) -> str:
    rows = {
        "promoted": decision.get("promoted"),
        "reason": decision.get("reason"),
        "model": decision.get("model"),
        "candidate version": decision.get("version"),
        "champion version before": decision.get("champion_version"),
        f"candidate {decision.get('metric')}": decision.get("candidate"),
        f"champion {decision.get('metric')}": decision.get("champion"),
    }
    parts = [
        "<h3>Decision</h3>",
        f"<p class='decision'><b>{_e(decision_sentence(decision))}</b></p>",
        _table({k: v for k, v in rows.items() if v is not None}),
    ]
    candidate_metrics = decision.get("candidate_metrics") or {}
    if candidate_metrics:
        parts.append("<h4>The candidate's test metrics</h4>" + _table(candidate_metrics))
    return "\n".join(parts)


def _compression(record: dict[str, Any]) -> str:
    """The original and the compressed model side by side: size, sparsity, latency, scores."""
    original, compressed = record.get("original") or {}, record.get("compressed") or {}
    rows = {
        key: {"original": original[key], "compressed": compressed[key]}
        for key in original
        if key in compressed and _finite(original[key]) and _finite(compressed[key])
    }
    return "<h3>Original vs compressed</h3>" + _grid_table(["original", "compressed"], rows)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


def _table(values: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(f'{v:.6g}' if isinstance(v, float) else v)}</td></tr>"
        for k, v in values.items()
    )
    return f"<table>{rows}</table>"


def _grid_table(columns: list[str], rows: dict[str, dict[str, Any]]) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
    body = "".join(
        f"<tr><td>{_e(label)}</td>"
        + "".join(f"<td>{_e(_num(values[c]) if c in values else '')}</td>" for c in columns)
        + "</tr>"
        for label, values in rows.items()
    )
    return f"<table>{head}{body}</table>"


def render_comparison(first: RunRecord, second: RunRecord) -> bytes:
    """Two runs side by side: each stage's config and metrics, differing values marked."""
    stages = stage_order(second) + [n for n in stage_order(first) if n not in second.stages]
    parts = [
        "<section id='runs'><h2>Runs</h2>",
        _compare_table(
            ["", first.run_id, second.run_id],
            {
                key: (getattr(first, key), getattr(second, key))
                for key in ("pipeline", "status", "storage")
            }
            | {"overrides": (" ".join(first.overrides), " ".join(second.overrides))},
        ),
        "</section>",
    ]
    for name in stages:
        a, b = first.stages.get(name), second.stages.get(name)
        parts.append(f"<section id='stage-{_e(name)}'><h2>{_e(name)}</h2>")
        if a is None or b is None:
            parts.append(f"<p>only in run {_e(second.run_id if a is None else first.run_id)}</p>")
        values = {"uses": (a and a.uses, b and b.uses), "state": (a and a.status, b and b.status)}
        values |= _pairs("config.", a and a.config, b and b.config)
        values |= _pairs("", a and _scalars(a.metrics), b and _scalars(b.metrics))
        parts.append(_compare_table(["", first.run_id, second.run_id], values))
        parts.append("</section>")
    differing = sum(part.count("class='differs'") for part in parts)
    title = f"raypipe runs {first.run_id} and {second.run_id}"
    head = f"<p>{differing} values differ (marked).</p>"
    return _page(title, head + "\n".join(parts), {})


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}


def _pairs(prefix: str, a: dict | None, b: dict | None) -> dict[str, tuple[Any, Any]]:
    flat_a, flat_b = _flatten(a or {}), _flatten(b or {})
    keys = list(dict.fromkeys([*flat_a, *flat_b]))
    missing = _Missing()
    return {f"{prefix}{k}": (flat_a.get(k, missing), flat_b.get(k, missing)) for k in keys}


class _Missing:
    def __str__(self) -> str:
        return "—"


def _compare_table(head: list[str], values: dict[str, tuple[Any, Any]]) -> str:
    rows = []
    for key, (a, b) in values.items():
        differs = _shown(a) != _shown(b)
        css = " class='differs'" if differs else ""
        cells = "".join(
            f"<td{' class=missing' if isinstance(v, _Missing) else ''}>{_e(_shown(v))}</td>"
            for v in (a, b)
        )
        rows.append(f"<tr{css}><td>{_e(key)}</td>{cells}</tr>")
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _e(value: Any) -> str:
    """A value as report text: bounded and redacted (guards.block), then escaped."""
    return html.escape(block(value), quote=True)


__all__ = [
    "REPORT_FILE",
    "RUN_FILE",
    "decision_sentence",
    "graph_svg",
    "render",
    "render_comparison",
    "stage_order",
    "write_comparison",
    "write_report",
]
