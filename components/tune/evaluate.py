"""``tune.evaluate``: scores a trained model on the test split and gates its promotion.

The candidate is a ``vision.train`` or ``tune.search`` artifact (both export ``model.pt``); the
data is the ``data.prepare`` artifact it was trained on, both named in ``needs:``. With
``register_as``, the candidate becomes a version of that registered model in the MLflow model
registry, and the registry's ``champion`` alias moves to it only if it meets every threshold and
beats the current champion by more than ``promote_if_better_by`` (no champion yet: meeting the
thresholds is enough). Each version carries its metrics as tags (``metric.test/accuracy``), so
a later gate compares against the champion without re-running it.

Concurrent gates of one model (two pipelines, a scheduled retrain next to a manual run) are
serialized by an exclusive ``fcntl`` lock next to the SQLite tracking database: the champion is
read, compared and the alias moved inside the lock, so the alias never lands on a model that
lost a comparison.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from components.api import Component, StageContext, StrictModel
from components.tune import adapters

ALIAS = "champion"
DECISION_FILE = "decision.json"
TAG_PREFIX = "metric."
GATED_METRICS = sorted({m for a in adapters.ADAPTERS.values() for m in a.test_metrics})


def _known_metric(name: str) -> str:
    if name not in GATED_METRICS:
        raise ValueError(f"unknown metric {name!r}; one of: {', '.join(GATED_METRICS)}")
    return name


class EvaluateConfig(StrictModel):
    """Settings of ``tune.evaluate``.

    Attributes:
        metric: the test metric that decides between candidate and champion.
        mode: ``max`` (accuracy) or ``min`` (loss): which direction is better.
        min: thresholds the candidate must reach (``{test/accuracy: 0.9}``).
        max: ceilings the candidate must stay under (``{test/loss: 0.5}``).
        promote_if_better_by: the margin by which the candidate must beat the champion.
        register_as: the registered model in MLflow; null evaluates and checks the thresholds
            without touching the registry.
    """

    metric: str = "test/accuracy"
    mode: Literal["max", "min"] = "max"
    min: dict[str, float] = Field(default_factory=dict)
    max: dict[str, float] = Field(default_factory=dict)
    promote_if_better_by: float = Field(0.0, ge=0)
    register_as: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9][\w.-]*$")

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        return _known_metric(value)

    @field_validator("min", "max")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            _known_metric(name)
        return value


@dataclass
class Decision:
    """What a gate decided, and why (saved in the artifact and the run record)."""

    promoted: bool
    reason: str
    metric: str
    candidate: float
    champion: float | None = None
    champion_version: str | None = None
    model: str | None = None
    version: str | None = None
    failed_thresholds: list[str] = field(default_factory=list)


def check_thresholds(metrics: dict[str, float], config: EvaluateConfig) -> list[str]:
    """The thresholds the candidate misses, as readable lines (empty: it meets them all)."""
    missed = [
        f"{name} {metrics[name]:.4f} < min {floor:g}"
        for name, floor in config.min.items()
        if metrics[name] < floor
    ]
    missed += [
        f"{name} {metrics[name]:.4f} > max {ceiling:g}"
        for name, ceiling in config.max.items()
        if metrics[name] > ceiling
    ]
    return missed


def decide(
    metrics: dict[str, float], champion: float | None, config: EvaluateConfig
) -> tuple[bool, str, list[str]]:
    """Whether a candidate with ``metrics`` replaces a champion scoring ``champion``.

    Returns:
        (promote, the reason in words, the thresholds it missed).
    """
    missed = check_thresholds(metrics, config)
    if missed:
        return False, "below thresholds: " + "; ".join(missed), missed
    value = metrics[config.metric]
    if champion is None:
        return True, f"no champion yet; {config.metric} {value:.4f} meets the thresholds", []
    gain = value - champion if config.mode == "max" else champion - value
    verdict = f"{config.metric} {value:.4f} vs champion {champion:.4f} (gain {gain:+.4f}"
    if gain > config.promote_if_better_by:
        return True, f"{verdict} > {config.promote_if_better_by:g})", []
    return False, f"{verdict} <= {config.promote_if_better_by:g} required)", []


def lock_path(tracking_uri: str | None, model: str) -> Path:
    """The lock file serializing gates of ``model``: beside the SQLite database, or (for a
    tracking server) in the temp directory, which serializes the gates of this host only."""
    safe = re.sub(r"[^\w.-]", "_", model)
    uri = tracking_uri or ""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///").split("?")[0])
        return db.with_name(f"{db.name}.{safe}.gate.lock")
    return Path(tempfile.gettempdir()) / f"raypipe-{safe}.gate.lock"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Holds an exclusive ``fcntl`` lock on ``path`` (released by the kernel if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def champion_of(client, model: str, metric: str) -> tuple[str | None, float | None]:
    """The version behind the ``champion`` alias and its ``metric`` (None, None: no champion).

    Raises:
        RuntimeError: the champion has no value for ``metric`` (gated on another metric).
    """
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(model, ALIAS)
    except MlflowException:
        return None, None
    value = version.tags.get(TAG_PREFIX + metric)
    if value is None:
        raise RuntimeError(
            f"champion {model} v{version.version} has no {metric} tag; "
            "gate with the metric it was promoted on"
        )
    return str(version.version), float(value)


def gate(
    tracking_uri: str | None,
    model: str,
    source: str,
    metrics: dict[str, float],
    config: EvaluateConfig,
    tags: dict[str, str] | None = None,
) -> Decision:
    """Registers the candidate as a new version of ``model`` and moves the ``champion`` alias
    to it if :func:`decide` says so; safe against concurrent gates of the same model.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI.
        model: the registered model's name.
        source: where the candidate's files live (its artifact directory).
        metrics: the candidate's test metrics (saved as ``metric.*`` tags of the version).
        config: the gate's settings.
        tags: more tags for the version (run id, stage, artifact digest).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    with exclusive(lock_path(tracking_uri, model)):
        # Everything from reading the champion to moving the alias happens under the lock.
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        try:
            client.get_registered_model(model)
        except MlflowException:
            client.create_registered_model(
                model, description="Registered by raypipe's tune.evaluate gate."
            )
        champion_version, champion = champion_of(client, model, config.metric)
        promote, reason, missed = decide(metrics, champion, config)
        version = client.create_model_version(
            model,
            source=source,
            tags={
                **{TAG_PREFIX + k: repr(float(v)) for k, v in metrics.items()},
                **(tags or {}),
                "gate.promoted": str(promote).lower(),
                "gate.reason": reason,
            },
            description=reason,
        )
        if promote:
            client.set_registered_model_alias(model, ALIAS, version.version)
    return Decision(
        promoted=promote,
        reason=reason,
        metric=config.metric,
        candidate=float(metrics[config.metric]),
        champion=champion,
        champion_version=champion_version,
        model=model,
        version=str(version.version),
        failed_thresholds=missed,
    )


class TuneEvaluate(Component):
    """Evaluates a trained model on the test split and promotes it to champion if it wins."""

    name = "tune.evaluate"
    version = "1"
    Config = EvaluateConfig

    def run(self, ctx: StageContext, config: EvaluateConfig) -> dict[str, Any]:
        data = ctx.input("data.")
        # Other gates may be in `needs:` only to order gates of one model; they are not models.
        candidates = [
            a
            for a in ctx.inputs.values()
            if a.component == "tune.search" or a.component in adapters.ADAPTERS
        ]
        if len(candidates) != 1:
            have = {name: a.component for name, a in ctx.inputs.items()}
            raise ValueError(
                f"stage {ctx.stage!r} needs one trained model (a vision.train or tune.search "
                f"stage) and its data.prepare stage in `needs:`; it has {have}"
            )
        candidate = candidates[0]
        trainable = (
            candidate.manifest["config"]["trainable"]
            if candidate.component == "tune.search"
            else candidate.component
        )
        metrics = adapters.get(trainable).evaluate(candidate.path, data.path)
        if config.register_as is None:
            missed = check_thresholds(metrics, config)
            decision = Decision(
                promoted=False,
                reason=("below thresholds: " + "; ".join(missed))
                if missed
                else "meets the thresholds (no register_as: nothing promoted)",
                metric=config.metric,
                candidate=float(metrics[config.metric]),
                failed_thresholds=missed,
            )
        else:
            decision = gate(
                ctx.tracking_uri,
                config.register_as,
                str(candidate.path),
                metrics,
                config,
                tags={
                    "raypipe.run_id": ctx.run_id,
                    "raypipe.stage": candidate.stage,
                    "raypipe.component": candidate.component,
                    "raypipe.digest": str(candidate.manifest.get("digest", "")),
                },
            )
        record = {"candidate_metrics": metrics, **asdict(decision)}
        (ctx.out_dir / DECISION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        return {
            **metrics,
            "promoted": decision.promoted,
            "reason": decision.reason,
            f"candidate/{config.metric}": decision.candidate,
            f"champion/{config.metric}": decision.champion,
            "champion_version_before": decision.champion_version,
            "model_version": decision.version,
            "champion_version": decision.version
            if decision.promoted
            else decision.champion_version,
        }
