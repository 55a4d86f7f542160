"""The trainable contract: what a model family declares once, so that the stage that trains it,
``tune.search``, ``tune.evaluate``, ``model.compress`` and ``raypipe serve`` all use it without
knowing the family.

A family lives in one folder, ``components/<family>/``:

- a component (``api.Component``) per ``uses:`` name, registered by one line in
  ``components/registry.py``; a training component names its hooks with
  ``trainable = "components.<family>.tuning:TRAINABLE"``;
- ``tuning.py``: a :class:`Trainable` built from the family's own functions (below);
- its model bundle (``components/bundle.py``), written by the stage and by :attr:`export`, with
  a loader of the family's own that ``bundle.load_model`` calls.

The same ``train_func`` runs in the stage (``training.fit``), in every Tune trial and in the
tests; the same :attr:`Trainable.prepare` reads the stage's inputs for the stage and for the
search; the same :attr:`Trainable.score` gives the stage's test metrics and the gate's. So a
model exported by a search, gated, or compressed is scored exactly as the stage scored it.

This module stays light (standard library only): hooks import torch and Ray when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.api import Resources, StageContext

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class TrialData:
    """What a training stage and every trial of a search over it share, read once from the
    stage's inputs by :attr:`Trainable.prepare`.

    Attributes:
        datasets: Ray datasets by split, read lazily; a search materializes them once so that
            every trial shares the blocks (the stage lets ``training.fit`` decide).
        spec: the family's own description of the data (shapes, classes, normalization,
            vocabulary...), handed to every worker as ``training.Loop.data``; plain data or a
            dataclass, it must pickle.
        data_dir: the data artifact's directory (test scoring reads its test split), if any.
        data_stage: the data stage's name, for messages.
        data_bytes: bytes of the shards (``training.fit`` caches small data in Ray's store).
        extra: more inputs the family read (e.g. a classifier's bundle for sample scores).
    """

    datasets: dict[str, Any]
    spec: Any = None
    data_dir: Path | None = None
    data_stage: str | None = None
    data_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreSettings:
    """How a trained model is scored on held-out data, where the family needs a choice (the
    gate's settings; families whose test split decides ignore them).

    Attributes:
        episodes: evaluation episodes (policies).
        seed: the env seed of the first evaluation episode (policies); None: the family's own.
    """

    episodes: int = 10
    seed: int | None = None


@dataclass(frozen=True)
class Smoke:
    """A family's smallest real run: the settings that train it in seconds on tiny data (for
    its tests, the contract test over every family, and examples).

    Attributes:
        config: ``with:`` settings of its stage (tiny network, one or two epochs).
        space: a search space of one trial over it (``tune.search``'s ``space``).
        needs: the kinds of the inputs its stage reads, in ``needs:`` order (the test builds a
            stage of each: a data stage, or another family's smoke run).
    """

    config: dict[str, Any]
    space: dict[str, Any]
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Compression:
    """What ``model.compress`` may do to a family's network (its loader rebuilds the result
    through ``bundle.build_module``).

    Attributes:
        quantize: the int8 methods that fit the network: ``dynamic`` (Linear and LSTM),
            ``weight_only`` (Linear, torchao), ``static`` (a CNN, torchao's PT2E flow).
        structured: whether structured pruning can remove channels: the network must be one
            chain of Conv2d/Linear layers with optional norms between (the CNN, the MLP).
        inputs: ``(model, data_dir, split, n) -> args``: ``n`` rows of a split as the arguments
            of the loaded model's ``module`` (to time it and to calibrate static int8).
    """

    quantize: tuple[str, ...]
    structured: bool
    inputs: Callable[[Any, Path, str, int], tuple]


@dataclass(frozen=True)
class Trainable:
    """How to train, search, export, load and score one family's model.

    Attributes:
        component: the ``uses:`` name of the training component.
        produces: the artifact kind of its model (``model/classifier``).
        epoch_metrics: what every epoch (RL: every evaluation) reports, each with the direction
            that is better; the first is what a search ranks by unless told otherwise.
        test_metrics: what :attr:`score` returns (what a gate may compare), likewise; the first
            is what a gate decides on unless told otherwise.
        scored_on: ``(bundle) -> test metrics`` a given model is scored on, for a family whose
            models differ (a tabular regressor: ``test/rmse`` first; a classifier:
            ``test/accuracy``); None: all of :attr:`test_metrics`.
        prepare: ``(ctx) -> TrialData``: reads the stage's inputs (by kind) once.
        export: ``(out_dir, checkpoint_dir, data, config) -> test metrics``: writes the model
            bundle of a finished trial from its checkpoint (a trial ASHA stopped ends at an
            epoch checkpoint: export its best weights).
        score: ``(bundle, ctx, settings) -> test metrics``: scores a trained model on held-out
            data found among ``ctx``'s inputs (a data artifact's test split, or env episodes).
        train_func: the Ray Train per-worker loop (``fn(config: dict)``, see
            ``training.Loop``) that a trial runs in a ``TorchTrainer``; None for a family that
            trains outside Ray Train.
        trial: a Tune trial function of its own (``fn(params, *, fixed, resources, seed)``,
            reporting to Tune itself), for a family without a Ray Train loop.
        split: datasets sharded across Train workers; the others reach every worker whole.
        budget_keys: the settings that set how many epochs (evaluations) a trial runs.
        budget: ``(config) -> int``: the epochs (evaluations) a complete trial runs.
        keeps_best: whether a trial exports its best epoch's weights (it is ranked by its best
            value) or its last (ranked by its last value).
        trial_cpus: ``(resources, config) -> CPUs`` a trial holds.
        reads_models: kinds of other models the family reads beside its data (a generative
            model's ``model/classifier``): a gate given such a model beside this family's
            takes this family's as the candidate.
        smoke: the family's smallest real run (see :class:`Smoke`).
        compression: what ``model.compress`` may do to its models (None: nothing).
    """

    component: str
    produces: str
    epoch_metrics: dict[str, Mode]
    test_metrics: dict[str, Mode]
    prepare: Callable[[StageContext], TrialData]
    export: Callable[[Path, Path, TrialData, Any], dict[str, Any]]
    score: Callable[[Any, StageContext, ScoreSettings], dict[str, Any]]
    train_func: Callable[[dict[str, Any]], None] | None = None
    trial: Callable[..., None] | None = None
    split: tuple[str, ...] = ("train",)
    budget_keys: tuple[str, ...] = ("epochs",)
    budget: Callable[[Any], int] = lambda config: config.epochs
    keeps_best: bool = False
    trial_cpus: Callable[[Resources, Any], float] = lambda resources, _config: (
        resources.workers * resources.cpus_per_worker
    )
    reads_models: tuple[str, ...] = ()
    smoke: Smoke | None = None
    scored_on: Callable[[Any], dict[str, Mode]] | None = None
    compression: Compression | None = None

    def __post_init__(self) -> None:
        if (self.train_func is None) == (self.trial is None):
            raise ValueError(f"{self.component}: give exactly one of train_func and trial")

    def test_metrics_of(self, bundle: Any) -> dict[str, Mode]:
        """The test metrics a trained model (its bundle) is scored on; the first is what a
        gate decides on unless told otherwise."""
        return self.test_metrics if self.scored_on is None else self.scored_on(bundle)

    @property
    def metric_modes(self) -> dict[str, Mode]:
        """Every metric it reports or is scored on, with its better direction."""
        return {**self.epoch_metrics, **self.test_metrics}
