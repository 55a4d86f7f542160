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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails


def _gpu_setting(value: Any) -> Literal["auto"] | bool:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"expected auto, true or false, got {value!r}")


GpuSetting = Annotated[Literal["auto"] | bool, PlainValidator(_gpu_setting)]


INT64 = (-(2**63), 2**63 - 1)


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, defaults are validated too.

    Numbers are numbers a run can use, in every config: floats are finite (no ``.inf`` or
    ``.nan``), integers fit in 64 bits (what arrays, seeds and C libraries hold), and ``true``
    or ``false`` is never taken for 1 or 0.
    """

    model_config = ConfigDict(
        extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False
    )

    @model_validator(mode="wrap")
    @classmethod
    def _usable_numbers(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
        validated = handler(data)
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                key = field.alias if field.alias in data else name
                if key not in data:
                    continue
                if problem := _number_problem(data[key], getattr(validated, name)):
                    error = InitErrorDetails(
                        type="value_error",
                        loc=(key,),
                        input=data[key],
                        ctx={"error": ValueError(problem)},
                    )
                    raise ValidationError.from_exception_data(cls.__name__, [error])
        return validated


def _number_problem(raw: Any, validated: Any) -> str | None:
    """What is wrong with the numbers pydantic made of ``raw`` (None: nothing): a boolean
    taken for a number, or an integer beyond 64 bits. Nested models check their own fields."""
    if isinstance(raw, bool):
        if not isinstance(validated, bool) and isinstance(validated, int | float):
            return f"expected a number, not {str(raw).lower()}"
        return None
    if isinstance(validated, int) and not isinstance(validated, bool):
        if not INT64[0] <= validated <= INT64[1]:
            return "an integer beyond 64 bits"
        return None
    if isinstance(raw, list | tuple) and isinstance(validated, list | tuple):
        for r, v in zip(raw, validated, strict=False):
            if problem := _number_problem(r, v):
                return problem
    elif isinstance(raw, dict) and isinstance(validated, dict):
        for key, r in raw.items():
            if key in validated and (problem := _number_problem(r, validated[key])):
                return problem
    return None


class Resources(StrictModel):
    """What a stage may use of the cluster.

    Attributes:
        workers: Ray Train workers (or env runners, or parallel tasks) the stage starts
            (1 to ``MAX_WORKERS``).
        gpu: ``auto`` uses GPUs when the cluster has any, ``true`` requires them, ``false``
            never uses them.
        cpus_per_worker: CPUs reserved for each worker (more than 0, at most
            ``MAX_CPUS_PER_WORKER``).
    """

    #: Bounds of what one stage may ask for: far above any cluster's, low enough that no
    #: count derived from them (gangs, placement bundles) explodes.
    MAX_WORKERS: ClassVar[int] = 4096
    MAX_CPUS_PER_WORKER: ClassVar[float] = 1024.0

    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    gpu: GpuSetting = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0, le=MAX_CPUS_PER_WORKER)

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
    #: The ``with:`` key that sets those CPUs instead, where a setting decides (errors quote it).
    task_cpus_setting: ClassVar[str | None] = None

    @classmethod
    def task_cpus_for(cls, config: Any) -> float:
        """CPUs the stage's own Ray task holds to run ``config``: its ``task_cpus_setting``
        key's value, else :attr:`task_cpus`."""
        if cls.task_cpus_setting is None:
            return cls.task_cpus
        return float(getattr(config, cls.task_cpus_setting))

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

    def stale_because(self, artifact: Path) -> str | None:
        """For a stage whose product lives outside the store as well (a running service): why
        its cached ``artifact`` no longer describes the world, or None when it still does.

        The engine asks before it reuses a cached artifact of a component that overrides this
        (with Ray connected); a reason makes the stage run again, as a broken artifact does.
        """
        return None

    def run(self, ctx: StageContext, config: Any) -> dict[str, Any]:
        """Does the stage's work, writing files into ``ctx.out_dir``; returns metrics."""
        raise NotImplementedError
