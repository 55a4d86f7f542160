"""``tune.evaluate``: scores a trained model and gates its promotion.

The candidate is a model artifact (kind ``model/...``: a trainable stage's, or a
``tune.search``'s over one) named in ``needs:``. It is scored by its family's own hook
(``components/contract.py``), found through its bundle: a model of images on the test split of
the dataset in ``needs:`` (a generative model also with the classifier in ``needs:``, whose
features give the Frechet distance of its samples); an RL policy over ``episodes``
deterministic episodes on env seeds apart from those it was evaluated on in training. This
module knows no family. With
``register_as``, the candidate becomes a version of that registered model in the MLflow model
registry, and the registry's ``champion`` alias moves to it only if it meets every threshold and
beats the current champion by more than ``promote_if_better_by`` (no champion yet: meeting the
thresholds is enough). Each version carries its metrics as tags (``metric.test/accuracy``), so
a later gate compares against the champion without re-running it. A version is a real MLflow
model (``components/serve/pyfunc.py``: a pyfunc wrapping the candidate's bundle), so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve`` work on it.

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

from pydantic import Field, field_validator, model_validator

from components import registry
from components.api import Component, InputArtifact, StageContext, StrictModel
from components.contract import ScoreSettings, Trainable

ALIAS = "champion"
DECISION_FILE = "decision.json"
TAG_PREFIX = "metric."


def gated_metrics() -> list[str]:
    """Every test metric some family is scored on (what a gate can compare)."""
    return sorted(
        {m for name in registry.trainable_names() for m in registry.trainable(name).test_metrics}
    )


def _known_metric(name: str) -> str:
    known = gated_metrics()
    if name not in known:
        raise ValueError(f"unknown metric {name!r}; one of: {', '.join(known)}")
    return name


class EvaluateConfig(StrictModel):
    """Settings of ``tune.evaluate``.

    Attributes:
        metric: the test metric that decides between candidate and champion; default: the
            candidate's first (``test/accuracy``, ``test/elbo``, ``test/fd_classifier``,
            ``test/episode_return_mean``).
        mode: ``max`` (accuracy) or ``min`` (loss): which direction is better; default: the
            metric's own.
        min: thresholds the candidate must reach (``{test/accuracy: 0.9}``).
        max: ceilings the candidate must stay under (``{test/loss: 0.5}``).
        max_drop: how much worse than the model it was compressed from a compressed candidate
            (``model.compress``) may score, on the same test split (``{test/accuracy: 0.005}``).
        promote_if_better_by: the margin by which the candidate must beat the champion.
        register_as: the registered model in MLflow; null evaluates and checks the thresholds
            without touching the registry.
        candidate: the stage in ``needs:`` whose model is gated; needed only where ``needs:``
            holds more than one trained model besides a generative model's classifier.
        episodes: deterministic episodes an RL policy is scored over.
        seed: env seed of the first of those episodes (the next ones count up from it);
            default: the family's own test seed.
    """

    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    min: dict[str, float] = Field(default_factory=dict)
    max: dict[str, float] = Field(default_factory=dict)
    max_drop: dict[str, float] = Field(default_factory=dict)
    promote_if_better_by: float = Field(0.0, ge=0)
    register_as: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9][\w.-]*$")
    candidate: str | None = None
    episodes: int = Field(10, ge=1)
    seed: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        """A metric named without a mode is better the way that metric is."""
        if isinstance(data, dict) and isinstance(data.get("metric"), str) and "mode" not in data:
            data = {**data, "mode": registry.metric_modes().get(data["metric"])}
        return data

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        return value if value is None else _known_metric(value)

    def resolved(self, trainable: Trainable, bundle: Any = None) -> EvaluateConfig:
        """This config with the metric and mode filled in for a candidate of ``trainable``
        (``bundle``: the candidate's, where the family scores its models differently).

        Raises:
            ValueError: a metric or threshold the candidate is not scored on.
        """
        scored = trainable.test_metrics if bundle is None else trainable.test_metrics_of(bundle)
        metric = self.metric or next(iter(scored))
        for name in [metric, *self.min, *self.max, *self.max_drop]:
            if name not in scored:
                raise ValueError(
                    f"a {trainable.component} model is not scored on {name}; it is on: "
                    + ", ".join(scored)
                )
        mode = self.mode or scored[metric]
        return self.model_copy(update={"metric": metric, "mode": mode})

    @field_validator("min", "max", "max_drop")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            _known_metric(name)
        return value

    @field_validator("max_drop")
    @classmethod
    def _drops(cls, value: dict[str, float]) -> dict[str, float]:
        negative = [name for name, drop in value.items() if drop < 0]
        if negative:
            raise ValueError(f"a drop is 0 or more: {', '.join(negative)}")
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


def check_thresholds(
    metrics: dict[str, float], config: EvaluateConfig, original: dict[str, float] | None = None
) -> list[str]:
    """The thresholds the candidate misses, as readable lines (empty: it meets them all).

    Args:
        metrics: the candidate's test metrics.
        config: the gate's settings.
        original: the test metrics of the model a compressed candidate was made from
            (``max_drop`` compares with them); None for a candidate that was not compressed.

    Raises:
        ValueError: a threshold on a metric the candidate lacks, or ``max_drop`` for a
            candidate that was not compressed.
    """
    absent = [name for name in [*config.min, *config.max, *config.max_drop] if name not in metrics]
    if absent:
        raise ValueError(f"the candidate has no {', '.join(absent)} (see the thresholds)")
    if config.max_drop and original is None:
        raise ValueError(
            "max_drop compares a compressed model with its original: the candidate is not a "
            "model.compress stage's model"
        )
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
    modes = registry.metric_modes()
    for name, bound in config.max_drop.items():
        worse = (
            original[name] - metrics[name]
            if modes[name] == "max"
            else metrics[name] - original[name]
        )
        if worse > bound:
            missed.append(
                f"{name} {metrics[name]:.4f} is {worse:.4f} worse than the original's "
                f"{original[name]:.4f} > max_drop {bound:g}"
            )
    return missed


def decide(
    metrics: dict[str, float],
    champion: float | None,
    config: EvaluateConfig,
    original: dict[str, float] | None = None,
) -> tuple[bool, str, list[str]]:
    """Whether a candidate with ``metrics`` replaces a champion scoring ``champion``
    (``original``: see :func:`check_thresholds`).

    Returns:
        (promote, the reason in words, the thresholds it missed).
    """
    if config.metric is None or config.mode is None:
        raise ValueError("the gate's metric is not resolved yet (see EvaluateConfig.resolved)")
    missed = check_thresholds(metrics, config, original)
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
    log_model: bool = False,
    original: dict[str, float] | None = None,
) -> Decision:
    """Registers the candidate as a new version of ``model`` and moves the ``champion`` alias
    to it if :func:`decide` says so; safe against concurrent gates of the same model.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI.
        model: the registered model's name.
        source: where the candidate's files live (its artifact directory).
        metrics: the candidate's test metrics (saved as ``metric.*`` tags of the version).
        config: the gate's settings.
        tags: more tags for the version (run id, stage, artifact digest). With the
            ``GATE_IDENTITY`` tags, a gate run again after its driver died (``raypipe
            resume``) finds the version it registered and does not register it twice.
        original: a compressed candidate's original test metrics (``max_drop``).
        log_model: log the candidate (a model bundle) as an MLflow model and make that the
            version's source; otherwise the version's source is the folder itself.
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
        earlier = _registered_before(client, model, tags or {})
        if earlier is not None and str(earlier.version) == champion_version:
            # This gate promoted it before its driver died: the decision stands.
            promote, reason, missed = True, earlier.tags.get("gate.reason", ""), []
            champion_version = earlier.tags.get("gate.champion_version") or None
            champion = _float_or_none(earlier.tags.get("gate.champion"))
            version = earlier
        else:
            promote, reason, missed = decide(metrics, champion, config, original)
            decision_tags = {
                "gate.promoted": str(promote).lower(),
                "gate.reason": reason,
                "gate.champion_version": champion_version or "",
                "gate.champion": "" if champion is None else repr(champion),
            }
            if earlier is not None:  # registered, then the driver died before the alias moved
                version = earlier
                for key, value in decision_tags.items():
                    client.set_model_version_tag(model, version.version, key, value)
            else:
                numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
                version_tags = {
                    **{TAG_PREFIX + k: repr(v) for k, v in numbers.items()},
                    **(tags or {}),
                    **decision_tags,
                }
                if log_model:
                    from components.serve.pyfunc import register

                    facts = {**(tags or {}), "metrics": numbers}
                    version = register(
                        client,
                        model,
                        source,
                        facts,
                        tracking_uri,
                        tags=version_tags,
                        description=reason,
                    )
                else:
                    version = client.create_model_version(
                        model, source=source, tags=version_tags, description=reason
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


#: The tags that identify one gate of one candidate in one pipeline run.
GATE_IDENTITY = ("raypipe.run_id", "raypipe.gate", "raypipe.digest")


def _registered_before(client, model: str, tags: dict[str, str]):
    """The version this very gate (same run, gate stage and candidate) registered before, if
    its driver died after registering: a resumed gate reuses it instead of registering the
    candidate twice (and then comparing it with itself)."""
    if not all(tags.get(key) for key in GATE_IDENTITY):
        return None
    for version in client.search_model_versions(f"name='{model}'"):
        if all(version.tags.get(key) == tags[key] for key in GATE_IDENTITY):
            return version
    return None


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text else None


class TuneEvaluate(Component):
    """Evaluates a trained model on the test split and promotes it to champion if it wins."""

    version = "2"  # 2: candidates found by artifact kind and scored through their bundle
    Config = EvaluateConfig
    produces = "gate/decision"

    def run(self, ctx: StageContext, config: EvaluateConfig) -> dict[str, Any]:
        candidate, bundle = _candidate(ctx, config)
        trainable = registry.trainable(bundle.component)
        config = config.resolved(trainable, bundle)
        settings = ScoreSettings(episodes=config.episodes, seed=config.seed)
        metrics = trainable.score(bundle, ctx, settings)
        # A compressed model carries its original's scores on the same split (model.compress).
        original = (bundle.meta.get("compression") or {}).get("original", {}).get("metrics")
        if config.register_as is None:
            missed = check_thresholds(metrics, config, original)
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
                    "raypipe.gate": ctx.stage,
                    "raypipe.stage": candidate.stage,
                    "raypipe.component": candidate.component,
                    "raypipe.digest": str(candidate.manifest.get("digest", "")),
                },
                log_model=True,
                original=original,
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


def _candidate(ctx: StageContext, config: EvaluateConfig) -> tuple[InputArtifact, Any]:
    """The input artifact whose model is gated, and its bundle.

    The candidates are the model artifacts in ``needs:`` (other gates may be there only to
    order gates of one model). A model that another candidate's family reads beside its data
    (a generative model's classifier) is not the candidate.

    Raises:
        ValueError: no candidate, or more than one and no ``candidate:`` to choose.
    """
    from components.bundle import read_bundle

    if config.candidate is not None:
        if config.candidate not in ctx.inputs:
            raise ValueError(
                f"candidate {config.candidate!r} is not in the `needs:` of stage {ctx.stage!r}"
            )
        chosen = ctx.inputs[config.candidate]
        return chosen, read_bundle(chosen.path)
    found = {a.stage: (a, read_bundle(a.path)) for a in ctx.inputs_of("model")}
    read = {
        kind
        for _, bundle in found.values()
        for kind in registry.trainable(bundle.component).reads_models
    }
    if len(found) > 1:
        found = {k: v for k, v in found.items() if v[0].kind not in read}
    if len(found) != 1:
        have = {name: a.kind for name, a in ctx.inputs.items()}
        raise ValueError(
            f"stage {ctx.stage!r} needs one trained model in `needs:` (a stage of "
            f"{', '.join(registry.trainable_names())}, or a tune.search over one), or "
            f"`candidate:` naming it; it has {have}"
        )
    return next(iter(found.values()))
