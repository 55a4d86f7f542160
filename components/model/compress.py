"""``model.compress``: prunes and quantizes a trained model of any family, and writes a smaller
model artifact that the family's own loader, the gate and ``raypipe serve`` take as they take
the original.

Read top to bottom: the config, then the stage: check the input (its checksums, its family's
support), score the original, prune (and fine-tune on Ray Train with the family's own loop),
quantize, save, load the saved model back through the family loader and score it on the same
test split, and time both at a fixed thread count. The mechanics are in
``components/compression.py``; what each family allows is its ``Trainable.compression``
(``components/contract.py``).

Honest sizes: unstructured pruning only writes zeros, so a dense ``weights.pt`` keeps its size
(``compress/sparsity`` and the gzip size show what the zeros are worth); structured pruning
removes channels (smaller tensors, less compute); static int8 keeps the calibrated fp32 weights
on disk (the int8 graph is made at load), so it is about speed, not size.
"""

from __future__ import annotations

import gzip
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from components import registry
from components.api import Component, InputArtifact, StageContext, StrictModel

COMPRESSION_FILE = "compression.json"
#: The batch sizes latency is measured at (``compress/latency_ms_b1``, ``_b64``).
BATCHES = (1, 64)


class Prune(StrictModel):
    """Magnitude pruning (``torch.nn.utils.prune``).

    Attributes:
        amount: the share of weights (unstructured) or of each layer's channels (structured)
            removed, in [0, 1).
        scope: ``global``: the smallest weights of all layers together; ``layer``: the same
            share of each layer (structured pruning is always per layer).
        structured: remove whole output channels (units) by L2 norm, making the tensors
            smaller, instead of zeroing single weights.
        finetune_epochs: epochs of the family's own training loop (Ray Train) on the train
            split after pruning, pruned weights held at zero; 0: none.
        finetune_lr_scale: the fine-tuning learning rate as a share of the one the model was
            trained with.
    """

    amount: float = Field(0.5, ge=0, lt=1)
    scope: Literal["global", "layer"] = "global"
    structured: bool = False
    finetune_epochs: int = Field(0, ge=0, le=1000)
    finetune_lr_scale: float = Field(0.1, gt=0, le=1)


class CompressConfig(StrictModel):
    """Settings of ``model.compress``.

    Attributes:
        prune: magnitude pruning (none when null).
        quantize: ``none``, ``dynamic`` (int8 Linear/LSTM weights, activations quantized per
            batch), ``static`` (int8 CNN, calibrated on ``calibration_rows`` train rows,
            compiled by Inductor) or ``weight_only`` (int8 Linear weights, torchao).
        calibration_rows: train rows static int8 is calibrated on.
        threads: torch threads while timing (the same for the original and the compressed).
        warmup: passes before timing (a static int8 model compiles in its first).
        rounds: timed passes of each model, interleaved; the median is reported.
    """

    prune: Prune | None = None
    quantize: Literal["none", "dynamic", "static", "weight_only"] = "none"
    calibration_rows: int = Field(256, ge=1, le=1 << 20)
    threads: int = Field(1, ge=1, le=1024)
    warmup: int = Field(3, ge=0, le=1000)
    rounds: int = Field(20, ge=1, le=100_000)

    @model_validator(mode="after")
    def _something_to_do(self) -> CompressConfig:
        if self.prune is None and self.quantize == "none":
            raise ValueError("nothing to do: give prune, quantize, or both")
        return self


class Compress(Component):
    """Prunes and/or quantizes the trained model in ``needs:`` (see the module docstring)."""

    version = "1"
    Config = CompressConfig
    produces = "model"  # the input model's kind: see artifact_kind

    def artifact_kind(self, config: CompressConfig, ctx: StageContext) -> str:
        return model_input(ctx).kind

    def run(self, ctx: StageContext, config: CompressConfig) -> dict[str, Any]:
        import copy
        from dataclasses import replace

        from components import compression as c
        from components.bundle import WEIGHTS_FILE, read_bundle, save_bundle
        from components.contract import ScoreSettings

        source = model_input(ctx)
        bundle = read_bundle(source.path)
        trainable, support = supported(bundle.component, config, ctx.stage)
        data_dir = ctx.input("dataset").path
        original = bundle.load()
        before = trainable.score(bundle, ctx, ScoreSettings())

        module, shapes, masks = copy.deepcopy(original.module), {}, {}
        if config.prune is not None:
            ctx.progress(note=f"pruning {config.prune.amount:g} of the weights")
            if config.prune.structured:
                shapes = c.structured_prune(module, config.prune.amount)
            else:
                masks = c.magnitude_masks(module, config.prune.amount, config.prune.scope)
            if config.prune.finetune_epochs:
                module = finetune(ctx, trainable, bundle, config.prune, module, shapes, masks)
        sparsity = c.sparsity(module)

        state = quantized_state(module, config, support, original, data_dir)
        recipe = {
            "quantize": config.quantize,
            "prune": None if config.prune is None else config.prune.model_dump(mode="json"),
            "shapes": shapes,
            "source": {"stage": source.stage, "digest": source.manifest.get("digest")},
            "original": {"metrics": before},
        }
        meta = {**bundle.meta, "compression": recipe}
        save_bundle(ctx.out_dir, replace(bundle, meta=meta, metrics={}), {"model": state})
        # Scored as everyone will score it: read back from disk through the family loader.
        saved = read_bundle(ctx.out_dir)
        compressed = saved.load()
        after = trainable.score(saved, ctx, ScoreSettings())
        save_bundle(ctx.out_dir, replace(saved, metrics=after), saved.weights())

        metric = next(iter(trainable.test_metrics_of(bundle)))
        sizes = {
            name: (path / WEIGHTS_FILE).read_bytes()
            for name, path in (("original", source.path), ("compressed", ctx.out_dir))
        }
        timed = timings(original.module, compressed.module, support, original, data_dir, config)
        numbers = {
            "size_bytes": len(sizes["compressed"]),
            "gzip_bytes": len(gzip.compress(sizes["compressed"], 6, mtime=0)),
            "sparsity": sparsity,
            **{f"latency_ms_b{b}": timed[b]["compressed"] for b in BATCHES},
        }
        reference = {
            "size_bytes": len(sizes["original"]),
            "gzip_bytes": len(gzip.compress(sizes["original"], 6, mtime=0)),
            "sparsity": c.sparsity(original.module),
            **{f"latency_ms_b{b}": timed[b]["original"] for b in BATCHES},
        }
        record = {
            "metric": metric,
            "recipe": {k: v for k, v in recipe.items() if k != "original"},
            "original": {**reference, **before},
            "compressed": {**numbers, **after},
        }
        (ctx.out_dir / COMPRESSION_FILE).write_text(json.dumps(record, indent=1, default=float))
        return {
            **after,
            **{f"compress/{k}": v for k, v in numbers.items()},
            "compress/size_ratio": numbers["size_bytes"] / reference["size_bytes"],
            "compress/gzip_ratio": numbers["gzip_bytes"] / reference["gzip_bytes"],
            **{
                f"compress/speedup_b{b}": timed[b]["original"] / timed[b]["compressed"]
                for b in BATCHES
            },
            "compress/metric": metric,
            "compress/metric_delta": after[metric] - before[metric],
            **{f"original/{k}": v for k, v in {**reference, **before}.items()},
        }


def model_input(ctx: StageContext) -> InputArtifact:
    """The one trained model in ``needs:``, after its files pass their checksums.

    Raises:
        ValueError: no model or several, or a file that differs from its manifest (naming
            the stage and the file).
    """
    from pipelines.store import ArtifactInvalid, check_files

    found = ctx.inputs_of("model")
    if len(found) != 1:
        have = {name: a.kind for name, a in ctx.inputs.items()}
        raise ValueError(f"stage {ctx.stage!r} needs one trained model in `needs:`; it has {have}")
    try:
        check_files(found[0].path, found[0].manifest)
    except ArtifactInvalid as e:
        raise ValueError(
            f"stage {ctx.stage!r}: the model artifact of stage {found[0].stage!r} fails its "
            f"checksums ({e}); run that stage again"
        ) from None
    return found[0]


def supported(component: str, config: CompressConfig, stage: str):
    """The family's hooks and what it allows, once the config asks only for that.

    Raises:
        ValueError: a family or method that does not fit, naming what does.
    """
    families = {
        name: registry.trainable(name).compression
        for name in registry.trainable_names()
        if registry.trainable(name).compression is not None
    }
    if component not in families:
        raise ValueError(
            f"stage {stage!r}: model.compress takes models of {', '.join(sorted(families))}; "
            f"this one is of {component}"
        )
    support = families[component]
    if config.quantize != "none" and config.quantize not in support.quantize:
        raise ValueError(
            f"stage {stage!r}: quantize: {config.quantize} does not fit a {component} model; "
            f"it supports: {', '.join(support.quantize)}"
        )
    if config.prune is not None and config.prune.structured and not support.structured:
        able = sorted(name for name, s in families.items() if s.structured)
        raise ValueError(
            f"stage {stage!r}: structured pruning needs a chain of layers ({', '.join(able)}); "
            f"a {component} model can take prune.structured: false"
        )
    return registry.trainable(component), support


def finetune(ctx, trainable, bundle, prune: Prune, module, shapes: dict, masks: dict):
    """The pruned ``module`` after ``prune.finetune_epochs`` of the family's own loop on Ray
    Train, on the train split of the data in ``needs:``, the pruned weights held at zero; its
    best epoch's weights (by the family's own validation metric), masks made permanent."""
    from components import compression as c
    from components import training

    if trainable.train_func is None:
        raise ValueError(
            f"stage {ctx.stage!r}: {bundle.component} has no training loop to fine-tune"
        )
    config = registry.get(bundle.component).Config.model_validate(
        {
            **bundle.config,
            "epochs": prune.finetune_epochs,
            "lr": bundle.config["lr"] * prune.finetune_lr_scale,
        }
    )
    start = {"weights": module.state_dict(), "shapes": shapes, "masks": masks}
    result = training.fit(
        trainable.train_func, config, ctx, trainable.prepare(ctx), trainable.split, start
    )
    c.apply_masks(module, masks)
    module.load_state_dict(result.state["best"]["model"])
    return c.make_permanent(module).eval()


def quantized_state(module, config: CompressConfig, support, original, data_dir) -> dict[str, Any]:
    """The state to save of ``module`` quantized as ``config.quantize`` says (see
    ``compression.restore``, which rebuilds it)."""
    from components import compression as c
    from components.training import torch_threads

    module.eval()
    if config.quantize == "dynamic":
        return c.pack_dynamic(c.quantize_dynamic(module))
    if config.quantize == "weight_only":
        return c.quantize_weight_only(module).state_dict()
    if config.quantize == "static":
        (images,) = support.inputs(original, data_dir, "train", config.calibration_rows)
        prepared = c.prepare_static(module, images[:2])
        with torch_threads(1):  # calibration statistics do not depend on threads; keep it light
            for lo in range(0, len(images), 64):
                prepared(images[lo : lo + 64])
        return prepared.state_dict()
    return module.state_dict()


def timings(original, compressed, support, loaded, data_dir, config: CompressConfig) -> dict:
    """Median milliseconds of a forward pass of each network at each of ``BATCHES``, on test
    rows, in interleaved rounds at ``config.threads`` threads."""
    from components import compression as c
    from components.training import torch_threads

    modules = {"original": original, "compressed": compressed}
    with torch_threads(config.threads):
        return {
            b: c.latency_ms(
                modules, support.inputs(loaded, data_dir, "test", b), config.warmup, config.rounds
            )
            for b in BATCHES
        }
