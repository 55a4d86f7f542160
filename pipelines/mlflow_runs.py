"""What raypipe logs to MLflow: a parent run for each pipeline run, a nested run for each
stage, whichever way it is written (MLflow's client, :class:`pipelines.tracking.Tracker`, or
raypipe's own database directly, :class:`pipelines.mlflow_sqlite.SqliteTracker`)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.guards import redact
from pipelines.record import StageEntry, Status
from pipelines.store import MANIFEST, stays_inside

MAX_PARAM_CHARS = 6000
MAX_STEP_METRICS = 20_000
ARTIFACT_SUFFIXES = (".png", ".json")
ARTIFACT_MAX_BYTES = 5 << 20


def parent_data(
    run_id: str, pipeline: str, overrides: list[str]
) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """A pipeline run's MLflow run: its name, tags (``raypipe.kind`` last: logged once the run
    is made) and params."""
    tags = [("raypipe.run_id", run_id), ("raypipe.pipeline", pipeline), ("raypipe.kind", "run")]
    params = [("overrides", _shown(" ".join(overrides)))] if overrides else []
    return f"{pipeline} {run_id}", tags, params


#: How many of :class:`StageData`'s tags a stage's run is made with (the rest are logged after).
STAGE_RUN_TAGS = 5


@dataclass
class StageData:
    """What a stage's nested MLflow run holds, whichever way it is written.

    Attributes:
        tags: (key, value), the first ``STAGE_RUN_TAGS`` those the run is made with.
        params: (key, value), redacted and cut to MLflow's limit.
        metrics: (key, value, timestamp in ms, step): the final ones, then the history's.
        files: (file, folder under the run's artifacts or None) to copy.
        status: the run's MLflow status.
    """

    tags: list[tuple[str, str]]
    params: list[tuple[str, str]]
    metrics: list[tuple[str, float, int, int]]
    files: list[tuple[Path, str | None]]
    status: str


def stage_data(
    name: str, entry: StageEntry, manifest: dict[str, Any] | None, parent_id: str | None
) -> StageData:
    """A settled stage as its nested MLflow run: its config as params, its metrics (final,
    and per step from ``history.jsonl``), its small plots and JSON files as artifacts."""
    tags = [
        ("mlflow.parentRunId", parent_id or ""),
        ("raypipe.stage", name),
        ("raypipe.component", entry.uses),
        ("raypipe.cache_hit", str(entry.cache_hit).lower()),
        ("raypipe.status", str(entry.status)),
    ]
    params = []
    if manifest is not None:
        flat = _flatten(manifest.get("config", {}))
        flat.update(_flatten(manifest.get("resources") or {}, "resources."))
        params = [(k, _shown(v)) for k, v in sorted(flat.items())]
        tags += [
            ("raypipe.artifact", _shown(manifest.get("path", ""))),
            ("raypipe.cache_key", str(manifest.get("cache_key", ""))),
            ("raypipe.component_version", str(manifest.get("version", ""))),
        ]
    now = int(time.time() * 1000)
    metrics = [(k, float(v), now, 0) for k, v in entry.metrics.items() if _number(v)]
    artifact_dir = Path(entry.artifact) if entry.artifact else None
    listed = (manifest or {}).get("files")
    listed = listed if isinstance(listed, dict) else None
    if artifact_dir is not None:
        history = artifact_dir / "history.jsonl"
        if (history.name in listed) if listed is not None else history.is_file():
            metrics += _history_metrics(history)
    if entry.error:
        tags.append(("raypipe.error", _shown(entry.error, 5000)))
    files = []
    # A cached stage's files were logged by the run that computed them (tag
    # raypipe.artifact points at them): copying them again on every rerun is waste.
    if artifact_dir is not None and not entry.cache_hit and artifact_dir.is_dir():
        files = _logged_files(artifact_dir, listed)
    status = {Status.SUCCEEDED: "FINISHED", Status.FAILED: "FAILED"}.get(entry.status, "KILLED")
    return StageData(tags, params, metrics, files, status)


def _logged_files(root: Path, listed: dict[str, Any] | None) -> list[tuple[Path, str | None]]:
    """An artifact's small plots and JSON files, each with the folder it goes under: those
    its manifest lists (sizes from there: no walk of the disk) and the manifest itself, or
    without a list, the directory's."""
    if listed is not None:
        sizes = {rel: meta.get("bytes", 0) for rel, meta in listed.items() if stays_inside(rel)}
        with contextlib.suppress(OSError):
            sizes[MANIFEST] = (root / MANIFEST).stat().st_size
    else:
        found = (p for p in root.rglob("*") if p.is_file())
        sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in found}
    files = []
    for rel in sorted(sizes):
        name = PurePosixPath(rel)
        if sizes[rel] <= ARTIFACT_MAX_BYTES and name.suffix in ARTIFACT_SUFFIXES:
            folder = name.parent.as_posix()
            files.append((root / rel, None if folder == "." else folder))
    return files


def _shown(value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """A param or tag value as MLflow may keep it: redacted, then cut to ``limit``."""
    return redact(str(value))[:limit]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(item) if isinstance(item, list) else item
    return out


def _history_metrics(path: Path) -> list[tuple[str, float, int, int]]:
    metrics = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        point = json.loads(line)
        step = int(point.get("step", i))
        stamp = int(point.get("time", time.time()) * 1000)
        for key, value in point.items():
            if key not in ("step", "time") and _number(value):
                metrics.append((key, float(value), stamp, step))
        if len(metrics) >= MAX_STEP_METRICS:
            break
    return metrics
