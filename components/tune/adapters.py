"""What ``tune.search`` and ``tune.evaluate`` need to know of each trainable component.

An adapter says how a trial trains (the component's Ray Train ``train_func`` inside a
``TorchTrainer``, or a trial function of its own), which metrics it reports every epoch (or
evaluation) and which way each is better, how to export the best trial as the component's own
artifact, and how to score a trained artifact for the gate: on the test split of its data
(``vision.train``, ``generative.vae``, ``generative.gan``) or over evaluation episodes
(``rl.ddpg``). Adding a trainable means adding one adapter here.

This module stays light to import: torch and Ray are imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.api import StageContext, StrictModel

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class TrialData:
    """What every trial of a search shares: datasets (materialized once), the loop config
    without the component's own settings, the dataset description, its artifact, and more
    inputs (a classifier)."""

    datasets: dict[str, Any]
    loop: dict[str, Any]
    info: Any = None
    data_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """How to search over and evaluate one trainable component.

    Attributes:
        component: the ``uses:`` name.
        epoch_metrics: metrics every epoch (or evaluation) reports, each with the direction
            that is better; the first is what a search ranks by unless it says otherwise.
        test_metrics: metrics :attr:`evaluate` returns (what a gate may compare), likewise.
        prepare: builds the :class:`TrialData` from the stage context.
        export: writes the artifact of a finished trial from its checkpoint directory; returns
            its test metrics.
        evaluate: scores a trained artifact (``candidate dir, stage context, gate config``).
        train_func: import path (``module:function``) of the Ray Train per-worker loop; a trial
            runs it in a ``TorchTrainer``.
        split: datasets sharded across the Train workers (the others reach each worker whole).
        trial: a trial function of its own, for a trainable that is not a Ray Train loop
            (``fn(params, fixed, resources, seed)``, reporting to Tune itself).
        budget_keys: settings that set how many epochs (evaluations) a trial runs.
        budget: the epochs (evaluations) a complete trial of a validated config runs.
        keeps_best: whether the exported weights are the trial's best epoch (the trial ranks
            by its best value) or its last (the trial ranks by its last value).
        trial_cpus: CPUs a trial holds, from the stage's resources and the trainable's config.
    """

    component: str
    epoch_metrics: dict[str, Mode]
    test_metrics: dict[str, Mode]
    prepare: Callable[[StageContext], TrialData]
    export: Callable[[Path, Path, TrialData, StrictModel], dict[str, Any]]
    evaluate: Callable[[Path, StageContext, Any], dict[str, Any]]
    train_func: str | None = None
    split: tuple[str, ...] = ("train",)
    trial: str | None = None
    budget_keys: tuple[str, ...] = ("epochs",)
    budget: Callable[[Any], int] = lambda config: config.epochs
    keeps_best: bool = False
    trial_cpus: Callable[[Any, Any], float] = lambda res, _config: res.workers * res.cpus_per_worker

    def load_train_func(self) -> Callable[[dict[str, Any]], None]:
        return _load(self.train_func)

    def load_trial(self) -> Callable[..., None]:
        return _load(self.trial)


def _load(path: str) -> Callable[..., Any]:
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _image_data(ctx: StageContext, component: str):
    from components.data.dataset import load_dataset_info

    data = ctx.input("data.")
    info = load_dataset_info(data.path)
    if info.kind != "image":
        raise ValueError(
            f"{component} needs an image dataset; stage {data.stage!r} produced {info.kind}"
        )
    return data, info


def _materialized(data_dir: Path, splits: tuple[str, ...]) -> dict[str, Any]:
    """Splits read once into the object store: every trial shares the blocks, and no trial
    waits for a free CPU to re-read shards while the others' workers hold every CPU."""
    from components.data.dataset import read_split

    return {s: read_split(data_dir, s).materialize() for s in splits}


# --- vision.train ---------------------------------------------------------------------------


def _vision_prepare(ctx: StageContext) -> TrialData:
    from components.vision.train import check_dataset

    data, info = _image_data(ctx, "vision.train")
    check_dataset(info, data.stage)
    datasets = _materialized(data.path, ("train", "val", "test"))
    loop = {
        "image_shape": list(info.image_shape),
        "num_classes": info.num_classes,
        "normalization": info.normalization,
    }
    return TrialData(datasets, loop, info, data.path)


def _vision_export(
    out_dir: Path, checkpoint: Path, data: TrialData, config: StrictModel
) -> dict[str, Any]:
    from components import training
    from components.vision.model import Classifier
    from components.vision.train import export

    state = training.load_state(checkpoint)
    # A trial that ASHA stopped ends at an epoch checkpoint, without the final test pass:
    # rebuild the architecture from its config and keep its best epoch's weights.
    c, h, w = data.info.image_shape
    cfg = config.model_dump()
    arch = (cfg["width"], cfg["depth"], cfg["dropout"], cfg["batch_norm"])
    hparams = state.get("hparams") or Classifier(c, data.info.num_classes, (h, w), *arch).hparams
    model = Classifier.from_hparams(hparams)
    model.load_state_dict(state["best"]["model"])
    model.eval()
    info = data.info
    metrics = _vision_score(model, list(info.image_shape), info.num_classes, data.data_dir)
    export(out_dir, state["best"]["model"], hparams, data.info, config, metrics)
    return metrics


def _vision_evaluate(model_dir: Path, ctx: StageContext, _config: Any) -> dict[str, Any]:
    from components.vision.train import load_classifier

    model, bundle = load_classifier(model_dir)
    data = ctx.input("data.").path
    return _vision_score(model, bundle["image_shape"], len(bundle["class_names"]), data)


def _vision_score(model, image_shape: list[int], num_classes: int, data_dir: Path) -> dict:
    """Test accuracy, macro-F1 and loss of a classifier (eval mode, CPU) on a data artifact."""
    import torch

    from components.data.dataset import load_numpy
    from components.vision.model import confusion_matrix, scores

    x, y = load_numpy(data_dir, "test")
    if list(x.shape[1:]) != list(image_shape):
        raise ValueError(
            f"the model takes images {list(image_shape)}, the test split of {data_dir} has "
            f"{list(x.shape[1:])}"
        )
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor(x[i : i + 512])) for i in range(0, len(x), 512)])
    target = torch.as_tensor(y)
    result = scores(confusion_matrix(logits.argmax(1), target, num_classes))
    return {
        "test/accuracy": result["accuracy"],
        "test/macro_f1": result["macro_f1"],
        "test/loss": float(torch.nn.functional.cross_entropy(logits, target)),
        "test/rows": len(y),
    }


# --- generative.vae, generative.gan ---------------------------------------------------------


def _classifier(ctx: StageContext, info, component: str, required: bool) -> dict | None:
    """The classifier of the ``vision.train`` stage in ``needs:`` that scores samples (its
    ``hparams`` and ``model`` weights), or None when there is none and none is required."""
    from components.vision.train import load_classifier

    found = [a for a in ctx.inputs.values() if a.component == "vision.train"]
    if len(found) > 1:
        raise ValueError(f"stage {ctx.stage!r} needs at most one vision.train stage in `needs:`")
    if not found:
        if required:
            raise ValueError(
                f"{component} is scored by the Frechet distance of its samples in a classifier's "
                f"features: stage {ctx.stage!r} needs a vision.train stage in `needs:`"
            )
        return None
    _model, bundle = load_classifier(found[0].path)
    if list(bundle["image_shape"]) != list(info.image_shape):
        raise ValueError(
            f"classifier of stage {found[0].stage!r} takes images {bundle['image_shape']}, "
            f"the data has {list(info.image_shape)}"
        )
    return {"hparams": bundle["hparams"], "model": bundle["model"]}


def _generative_prepare(kind: str) -> Callable[[StageContext], TrialData]:
    splits = ("train", "val", "test") if kind == "vae" else ("train", "val")

    def prepare(ctx: StageContext) -> TrialData:
        component = f"generative.{kind}"
        data, info = _image_data(ctx, component)
        classifier = _classifier(ctx, info, component, required=kind == "gan")
        loop = {
            "image_shape": list(info.image_shape),
            "num_classes": info.num_classes,
            "shift": list(info.normalization["shift"]),
            "divisor": list(info.normalization["divisor"]),
            "classifier": classifier,
        }
        datasets = _materialized(data.path, splits)
        return TrialData(datasets, loop, info, data.path, {"classifier": classifier})

    return prepare


def _generative_export(kind: str):
    def export(out_dir: Path, checkpoint: Path, data: TrialData, config: Any) -> dict[str, Any]:
        from components import training
        from components.generative import sampling
        from components.generative.common import build_sampler
        from components.generative.metrics import score_test_split

        state = training.load_state(checkpoint)
        model = build_sampler(kind, config, data.info.image_shape, data.info.num_classes)
        model.load_state_dict(state["model"])
        model.eval()
        classifier = data.extra["classifier"]
        metrics = score_test_split(model, kind, config, data.info, data.data_dir, classifier)
        grid = sampling.generate(model, config.grid_samples, None, seed=config.seed)
        sampling.save_grid(grid, out_dir / "samples.png")
        sampling.export(out_dir, kind, state["model"], model.hparams, data.info, config, metrics)
        return metrics

    return export


def _generative_evaluate(candidate: Path, ctx: StageContext, _config: Any) -> dict[str, Any]:
    from components import registry
    from components.generative.metrics import score_test_split
    from components.generative.sampling import load_generator

    model, bundle = load_generator(candidate)
    component = f"generative.{bundle['kind']}"
    data, info = _image_data(ctx, component)
    if list(bundle["image_shape"]) != list(info.image_shape):
        raise ValueError(
            f"the model makes images {bundle['image_shape']}, the data of stage "
            f"{data.stage!r} has {list(info.image_shape)}"
        )
    classifier = _classifier(ctx, info, component, required=bundle["kind"] == "gan")
    config = registry.get(component).Config.model_validate(bundle["config"])
    return score_test_split(model, bundle["kind"], config, info, data.path, classifier)


# --- rl.ddpg --------------------------------------------------------------------------------

#: Env seed of the first episode a trained policy is scored on: apart from the seeds RLlib's
#: evaluation runner uses during training, as a test split is apart from validation.
RL_TEST_SEED = 10_000


def _rl_prepare(_ctx: StageContext) -> TrialData:
    return TrialData(datasets={}, loop={})


def _env_runners(settings: Any, resources: Any) -> int:
    workers = resources["workers"] if isinstance(resources, dict) else resources.workers
    return workers if settings.env_runners is None else settings.env_runners


def rl_trial(params: dict[str, Any], *, fixed: dict[str, Any], resources: dict, seed: int) -> None:
    """One ``rl.ddpg`` trial: trains in the trial's own process (env runners, if any, are
    actors of their own) and reports each evaluation to Tune, with the policy exported at that
    point as the checkpoint, so the search keeps the policy of the trial's best evaluation."""
    import tempfile

    from ray import tune

    from components.rl.stage import (
        DDPGSettings,
        build_algorithm_config,
        export_actor,
        register_custom_env,
        train_iterations,
    )

    settings = DDPGSettings.model_validate({**fixed, **params})
    seed = seed if settings.seed is None else settings.seed
    register_custom_env(settings)
    algo = build_algorithm_config(settings, seed, _env_runners(settings, resources)).build_algo()
    try:
        for evaluations, metrics in enumerate(train_iterations(algo, settings.timesteps), 1):
            with tempfile.TemporaryDirectory(prefix="raypipe-policy-") as tmp:
                export_actor(algo, Path(tmp), settings, seed)
                checkpoint = tune.Checkpoint.from_directory(tmp)
                done = metrics["train/env_steps"] >= settings.timesteps
                report = {**metrics, "epochs_done": evaluations, "completed": done}
                tune.report(report, checkpoint=checkpoint)
    finally:
        algo.stop()


def _rl_export(out_dir: Path, checkpoint: Path, _data: TrialData, config: Any) -> dict[str, Any]:
    import shutil

    from components.rl.policy import POLICY_DIR

    shutil.copytree(Path(checkpoint) / POLICY_DIR, out_dir / POLICY_DIR)
    return _rl_score(out_dir, config.eval_episodes, RL_TEST_SEED)


def _rl_evaluate(candidate: Path, _ctx: StageContext, config: Any) -> dict[str, Any]:
    return _rl_score(candidate, config.episodes, config.seed)


def _rl_score(folder: Path, episodes: int, seed: int) -> dict[str, Any]:
    """Returns of the exported policy over ``episodes`` deterministic episodes (env seeds
    ``seed``, ``seed + 1``, ...)."""
    import numpy as np

    from components.rl.policy import rollout

    returns = rollout(Path(folder), episodes=episodes, seed=seed)
    return {
        "test/episode_return_mean": float(np.mean(returns)),
        "test/episode_return_std": float(np.std(returns)),
        "test/episode_return_min": float(np.min(returns)),
        "test/episodes": episodes,
        "test/episode_returns": [float(r) for r in returns],
    }


ADAPTERS: dict[str, Adapter] = {
    "vision.train": Adapter(
        component="vision.train",
        train_func="components.vision.train:train_func",
        epoch_metrics={
            "val/accuracy": "max",
            "val/loss": "min",
            "val/macro_f1": "max",
            "train/loss": "min",
        },
        test_metrics={"test/accuracy": "max", "test/macro_f1": "max", "test/loss": "min"},
        split=("train",),
        prepare=_vision_prepare,
        export=_vision_export,
        evaluate=_vision_evaluate,
        keeps_best=True,  # the final checkpoint holds the best epoch's weights
    ),
    "generative.vae": Adapter(
        component="generative.vae",
        train_func="components.generative.vae:train_func",
        epoch_metrics={"val/elbo": "max", "val/recon": "min", "train/loss": "min"},
        test_metrics={"test/elbo": "max", "test/recon": "min", "test/fd_classifier": "min"},
        prepare=_generative_prepare("vae"),
        export=_generative_export("vae"),
        evaluate=_generative_evaluate,
    ),
    "generative.gan": Adapter(
        component="generative.gan",
        train_func="components.generative.gan:train_func",
        epoch_metrics={"val/fd_classifier": "min", "train/d_loss": "min", "train/g_loss": "min"},
        test_metrics={"test/fd_classifier": "min", "test/cond_accuracy": "max"},
        prepare=_generative_prepare("gan"),
        export=_generative_export("gan"),
        evaluate=_generative_evaluate,
    ),
    "rl.ddpg": Adapter(
        component="rl.ddpg",
        trial="components.tune.adapters:rl_trial",
        epoch_metrics={"eval/episode_return_mean": "max", "train/critic_loss": "min"},
        test_metrics={
            "test/episode_return_mean": "max",
            "test/episode_return_min": "max",
            "test/episode_return_std": "min",
        },
        prepare=_rl_prepare,
        export=_rl_export,
        evaluate=_rl_evaluate,
        budget_keys=("timesteps",),
        budget=lambda config: math.ceil(config.timesteps / config.eval_every),
        keeps_best=True,  # Tune keeps every evaluation's policy; the best one is exported
        trial_cpus=lambda resources, config: 1 + _env_runners(config, resources),
    ),
}

METRIC_MODES: dict[str, Mode] = {
    name: mode
    for adapter in ADAPTERS.values()
    for name, mode in {**adapter.epoch_metrics, **adapter.test_metrics}.items()
}


def get(component: str) -> Adapter:
    """The adapter of a trainable component.

    Raises:
        ValueError: the component has no adapter (the message lists those that do).
    """
    try:
        return ADAPTERS[component]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"{component!r} cannot be tuned or gated yet; known: {known}") from None
