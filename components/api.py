"""The contract between the pipeline engine and the components it runs.

A component is a class registered under a ``uses:`` name (``components/registry.py``) with a
``version`` (bump it when the output for the same config changes), a pydantic ``Config`` model
that validates the stage's ``with:`` block, the kind of artifact it publishes (``produces``),
and a ``run(ctx, config)`` method that writes files into ``ctx.out_dir`` and returns metrics.
Components know nothing else of the engine: they get their inputs as published artifact
directories (path + manifest), asked for by kind (``ctx.input("dataset/image")``), and never
see live Python objects from other stages.

A component that trains a model also names its family's hooks (``trainable``): how a Tune
trial trains it, how its model is exported, loaded and scored (``components/contract.py``).

Modules that define components stay light to import (pydantic and the standard library):
heavy imports (torch, ray.train, rllib) go inside ``run`` so that validating a pipeline file
is fast and never starts Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator


def _gpu_setting(value: Any) -> Literal["auto"] | bool:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"expected auto, true or false, got {value!r}")


GpuSetting = Annotated[Literal["auto"] | bool, PlainValidator(_gpu_setting)]


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class Resources(StrictModel):
    """What a stage may use of the cluster.

    Attributes:
        workers: Ray Train workers (or env runners, or parallel tasks) the stage starts.
        gpu: ``auto`` uses GPUs when the cluster has any, ``true`` requires them, ``false``
            never uses them.
        cpus_per_worker: CPUs reserved for each worker.
    """

    workers: int = 1
    gpu: GpuSetting = "auto"
    cpus_per_worker: float = 1.0

    def use_gpu(self, cluster_gpus: float) -> bool:
        """Resolves ``gpu`` against the GPUs the cluster has.

        Raises:
            RuntimeError: ``gpu: true`` on a cluster without GPUs.
        """
        if self.gpu == "auto":
            return cluster_gpus >= 1
        if self.gpu and cluster_gpus < 1:
            raise RuntimeError("resources.gpu is true but the Ray cluster has no GPU")
        return bool(self.gpu)


@dataclass(frozen=True)
class InputArtifact:
    """A published artifact of an upstream stage, as a local directory and its manifest."""

    stage: str
    path: Path
    manifest: dict[str, Any]

    @property
    def component(self) -> str:
        return self.manifest["component"]

    @property
    def kind(self) -> str:
        """What the artifact holds (``dataset/image``, ``model/classifier``, ...)."""
        return self.manifest["kind"]

    def is_kind(self, kind: str) -> bool:
        """Whether the artifact is of ``kind``, or of a kind under it (``dataset`` matches
        ``dataset/image``)."""
        return self.kind == kind or self.kind.startswith(kind.rstrip("/") + "/")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def file(self, relpath: str) -> Path:
        """Returns the path of one of the artifact's files, checking that it is listed."""
        if relpath not in self.manifest.get("files", {}):
            raise FileNotFoundError(f"artifact of stage {self.stage!r} has no file {relpath!r}")
        return self.path / relpath


@dataclass
class StageContext:
    """What a running stage gets from the engine.

    Attributes:
        stage: the stage's name in the pipeline file.
        run_id: the pipeline run this stage belongs to.
        out_dir: an empty local directory; everything written here becomes the artifact,
            published atomically by the engine after ``run`` returns.
        scratch_dir: a directory (local path or storage URI) that survives failed attempts of
            the same stage config: training checkpoints go here so a rerun resumes them.
        inputs: the artifacts of the stages named in ``needs``, by stage name.
        resources: the stage's ``resources:`` block.
        tracking_uri: the MLflow tracking URI of the pipeline.
        seed: a seed derived from the pipeline and stage names, for components without one.
    """

    stage: str
    run_id: str
    out_dir: Path
    scratch_dir: str
    inputs: dict[str, InputArtifact]
    resources: Resources
    tracking_uri: str | None = None
    seed: int = 0
    on_progress: Callable[[dict[str, Any]], None] | None = None
    _history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def input(self, kind: str | None = None) -> InputArtifact:
        """Returns the single input of ``kind`` (or of a kind under it: ``dataset`` matches
        ``dataset/image``), or the single input when no kind is given.

        Raises:
            ValueError: no such input, or more than one matches (the message lists the inputs).
        """
        found = self.inputs_of(kind)
        if len(found) != 1:
            want = f"one input of kind {kind!r}" if kind else "one input"
            if len(found) > 1:
                want = f"exactly {want}"
            have = {name: a.kind for name, a in self.inputs.items()}
            raise ValueError(f"stage {self.stage!r} needs {want} in `needs:`; it has {have}")
        return found[0]

    def inputs_of(self, kind: str | None) -> list[InputArtifact]:
        """Every input of ``kind`` (or of a kind under it), in ``needs:`` order."""
        return [a for a in self.inputs.values() if kind is None or a.is_kind(kind)]

    def report(self, step: int | None = None, **metrics: Any) -> None:
        """Records one point of the stage's progress (an epoch, an iteration, a batch of rows).

        The points are saved in the artifact as ``history.jsonl`` and shown as live progress.
        """
        point = {"time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        self._history.append(point)
        if self.on_progress is not None:
            self.on_progress(point)

    def progress(self, **metrics: Any) -> None:
        """Shows a live progress point without recording it (e.g. an epoch that a restart may
        redo; record the final curve with :meth:`report`)."""
        if self.on_progress is not None:
            self.on_progress({"time": time.time(), **metrics})

    def write_history(self) -> None:
        """Writes the reported points to ``out_dir/history.jsonl`` (the engine calls this)."""
        if self._history:
            with open(self.out_dir / "history.jsonl", "w") as f:
                for point in self._history:
                    f.write(json.dumps(point, sort_keys=True, default=float) + "\n")


class Component:
    """Base class of the stages a pipeline is built from (see the module docstring)."""

    version: ClassVar[str] = "1"
    Config: ClassVar[type[StrictModel]]
    #: The kind of artifact a stage publishes: ``dataset/<what>``, ``model/<family>``, ...;
    #: consumers ask for inputs by kind. See :meth:`artifact_kind` for kinds known only at run.
    produces: ClassVar[str]
    #: Import path (``module:attribute``) of the family's :class:`components.contract.Trainable`
    #: when the stage trains a model that can be searched, gated, compressed and served.
    trainable: ClassVar[str | None] = None
    #: Whether ``resources`` are part of the cache key (false where they cannot change output).
    resources_affect_output: ClassVar[bool] = True
    #: CPUs the stage's own Ray task holds; work it starts (Train, Tune, tasks) asks for its own.
    task_cpus: ClassVar[float] = 0.0

    def source_paths(self, config: Any) -> list[str]:
        """Files or folders the stage reads from outside the pipeline (its data sources).

        The engine adds their sizes and modification times to the cache key, so a source that
        was edited in place is read again rather than served from cache.
        """
        return []

    def artifact_kind(self, config: Any, ctx: StageContext) -> str:
        """The kind of the artifact ``run`` just wrote (default: :attr:`produces`); a component
        whose kind depends on its config or data (``data.prepare``) overrides this."""
        return self.produces

    def run(self, ctx: StageContext, config: Any) -> dict[str, Any]:
        """Does the stage's work, writing files into ``ctx.out_dir``; returns metrics."""
        raise NotImplementedError
