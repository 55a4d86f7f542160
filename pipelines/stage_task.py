"""The Ray task that runs one stage: resolve its inputs, run its component into a fresh
directory, publish the directory as the stage's artifact.

The driver (``engine.py``) sends a :class:`StageJob` (plain data) and gets back the published
manifest. The component writes into a directory nobody else sees; only when ``run`` returns is
the directory checksummed and published, so a failure or a kill leaves no artifact behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from components import registry
from components.api import InputArtifact, Resources, StageContext
from pipelines.record import progress_file
from pipelines.store import ArtifactInvalid, Store


@functools.cache
def code_version() -> str:
    """The installed raypipe version (saved with every artifact)."""
    try:
        return metadata.version("raypipe")
    except metadata.PackageNotFoundError:
        return "unknown"


def stage_seed(pipeline_name: str, stage: str) -> int:
    """A stable per-stage seed for components that are not given one."""
    return int.from_bytes(hashlib.sha256(f"{pipeline_name}/{stage}".encode()).digest()[:4], "big")


@dataclass(frozen=True)
class StageJob:
    """Everything a stage task needs, as plain data (it is sent to a Ray worker)."""

    run_id: str
    pipeline: str
    stage: str
    component: str
    config: dict[str, Any]
    resources: dict[str, Any]
    cache_key: str
    storage: str
    tracking_uri: str | None
    inputs: dict[str, tuple[str, str]]  # stage -> (component, cache key)
    replace: bool = False


def execute_stage(job: StageJob) -> dict[str, Any]:
    """Runs one stage and publishes its artifact; returns the artifact's manifest.

    This is the body of the Ray task (see the module docstring).
    """
    store = Store(job.storage)
    component_cls = registry.get(job.component)
    config = component_cls.Config.model_validate(job.config)
    inputs = {}
    for stage, (component, key) in job.inputs.items():
        manifest = store.read_manifest(component, key)
        if manifest is None:
            raise ArtifactInvalid(f"input artifact of stage {stage!r} disappeared")
        inputs[stage] = InputArtifact(
            stage, store.local_artifact_dir(component, key, manifest), manifest
        )
    out_dir = store.new_output_dir(job.cache_key)
    progress = ProgressWriter(store, job.run_id, job.stage)
    ctx = StageContext(
        stage=job.stage,
        run_id=job.run_id,
        out_dir=out_dir,
        scratch_dir=store.scratch(job.cache_key),
        inputs=inputs,
        resources=Resources.model_validate(job.resources),
        tracking_uri=job.tracking_uri,
        seed=stage_seed(job.pipeline, job.stage),
        on_progress=progress,
    )
    started = time.time()
    try:
        component = component_cls()
        metrics = component.run(ctx, config) or {}
        ctx.write_history()
        finished = time.time()
        manifest = {
            "component": job.component,
            "kind": component.artifact_kind(config, ctx),
            "version": component_cls.version,
            "cache_key": job.cache_key,
            "stage": job.stage,
            "run_id": job.run_id,
            "config": job.config,
            "resources": job.resources,
            "inputs": {
                s: {"component": inputs[s].component, "digest": inputs[s].manifest["digest"]}
                for s in inputs
            },
            "metrics": plain(metrics),
            "timings": {"start": started, "end": finished, "seconds": finished - started},
            "seed": ctx.seed,
            "code_version": code_version(),
            "host": os.uname().nodename,
            "pid": os.getpid(),
        }
        if job.replace:
            store.discard(job.component, job.cache_key)
        published = store.publish(out_dir, job.component, job.cache_key, manifest)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    store.drop_scratch(job.cache_key)
    return published


@functools.cache
def remote_stage_task() -> Any:
    """``execute_stage`` as a Ray remote function, made once (exporting it costs ~10 ms)."""
    import ray

    return ray.remote(execute_stage)


class ProgressWriter:
    """Appends a stage's progress points to its progress file (local storage only)."""

    def __init__(self, store: Store, run_id: str, stage: str):
        self.path = progress_file(store, run_id, stage)
        self.enabled = store.is_local

    def __call__(self, point: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(plain(point), sort_keys=True) + "\n")


def plain(value: Any) -> Any:
    """Converts numpy scalars and the like into JSON-friendly Python values."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    return str(value)
