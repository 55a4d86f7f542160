"""The generative family's hooks (``components/contract.py``) for ``generative.vae`` and
``generative.gan``: for ``tune.search``, ``tune.evaluate`` and every other consumer of a
trained VAE or generator. They read the data, save and score the model with the stages' own
functions (``common.py``), so a model is scored one way wherever it was trained. Nothing in the
family imports this module.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from components.api import StageContext
from components.contract import ScoreSettings, Smoke, Trainable, TrialData
from components.generative import gan, vae
from components.generative.common import Family, describe, prepare, save, test_scores


def _prepare(family: Family):
    def prepare_trials(ctx: StageContext) -> TrialData:
        return prepare(ctx, family, classifier_required=family.needs_classifier)

    return prepare_trials


def _export(family: Family):
    def export(out_dir: Path, checkpoint: Path, data: TrialData, config) -> dict[str, Any]:
        """The trial's last weights, scored on the test split, with a grid of samples."""
        from components import training

        state = training.load_state(checkpoint)
        spec, classifier = data.spec.image, data.spec.classifier
        hparams = state.get("hparams") or _hparams(family, config, spec)
        bundle = describe(family, hparams, spec, config, {})
        model = replace(bundle, tensors={"model": state["model"]}).load()
        metrics = test_scores(family, model, config, spec, data.data_dir, classifier)
        model.sample_grid(config.grid_samples, None, Path(out_dir) / "samples.png", config.seed)
        save(out_dir, family, state["model"], hparams, spec, config, metrics)
        return metrics

    return export


def _hparams(family: Family, config, spec) -> dict:
    from components.generative.common import build_sampler

    return build_sampler(family.network(), config, spec).hparams


def _score(family: Family):
    def score(bundle, ctx: StageContext, _settings: ScoreSettings) -> dict[str, Any]:
        """Test scores of a trained model on the image dataset in ``needs:`` (sample scores
        with the classifier in ``needs:``; a GAN needs one)."""
        data = prepare(ctx, family, classifier_required=family.needs_classifier)
        spec = data.spec.image
        if list(bundle.output["shape"]) != list(spec.image_shape):
            raise ValueError(
                f"the model makes images {bundle.output['shape']}, the data of stage "
                f"{data.data_stage!r} has {list(spec.image_shape)}"
            )
        # Scored with the seeds it was trained with, as the stage and the search scored it.
        config = family.Config.model_validate(bundle.config)
        model = bundle.load()
        return test_scores(family, model, config, spec, data.data_dir, data.spec.classifier)

    return score


def _trainable(family: Family, epoch_metrics: dict, test_metrics: dict, smoke: Smoke) -> Trainable:
    return Trainable(
        component=family.component,
        produces=family.kind,
        train_func=family.train_func,
        epoch_metrics=epoch_metrics,
        test_metrics=test_metrics,
        prepare=_prepare(family),
        export=_export(family),
        score=_score(family),
        split=("train",),
        reads_models=("model/classifier",),
        smoke=smoke,
    )


_TINY = {
    "epochs": 2,
    "batch_size": 64,
    "width": 8,
    "depth": 1,
    "grid_samples": 16,
    "eval_per_label": 10,
}
_NEEDS = ("dataset/image", "model/classifier")  # the stage scores samples in its features


VAE = _trainable(
    vae.FAMILY,
    epoch_metrics={"val/elbo": "max", "val/recon": "min", "train/loss": "min"},
    test_metrics={"test/elbo": "max", "test/recon": "min", "test/fd_classifier": "min"},
    smoke=Smoke({**_TINY, "latent_dim": 4}, {"lr": {"choice": [3.0e-3]}}, _NEEDS),
)
GAN = _trainable(
    gan.FAMILY,
    epoch_metrics={"val/fd_classifier": "min", "train/d_loss": "min", "train/g_loss": "min"},
    test_metrics={"test/fd_classifier": "min", "test/cond_accuracy": "max"},
    smoke=Smoke({**_TINY, "latent_dim": 8}, {"lr_g": {"choice": [2.0e-3]}}, _NEEDS),
)
