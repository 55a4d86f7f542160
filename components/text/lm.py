"""``text.lm``: a character/BPE language model on Ray Train, ``arch: gpt`` (a small decoder-only
transformer) or ``arch: lstm``.

Read top to bottom: the config, the per-worker loop (``train_func``: the same function serves
the stage, Tune and the tests), the stage that drives it, then the family's data, bundle and
scores (used by ``tuning.py`` too). An "epoch" here is ``steps_per_epoch`` optimizer steps on
random windows of the token stream, then an evaluation on the validation split, sample texts
from fixed prompts and a checkpoint. The networks are in ``models.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.api import Component, StageContext
from components.contract import TrialData
from components.text.common import OptimizerSettings

TASK = "language_model"
SAMPLES_FILE = "samples.txt"


class LMConfig(OptimizerSettings):
    """Settings of ``text.lm`` (the optimizer's are in ``OptimizerSettings``, the Ray Train
    ones in ``TrainSettings``).

    Attributes:
        arch: ``gpt`` (pre-norm decoder-only transformer, tied embeddings) or ``lstm``.
        epochs: evaluations (each after ``steps_per_epoch`` steps, each checkpointed).
        steps_per_epoch: optimizer steps between evaluations.
        batch_size: windows per step, per worker.
        context: tokens each window feeds the model (at most the data's ``block_tokens``).
        lr: peak learning rate (AdamW; warm-up and cosine decay in ``OptimizerSettings``).
        dropout: dropout in the network.
        gpt_layers: transformer blocks (``gpt``).
        gpt_heads: attention heads (``gpt``; ``gpt_width`` must be divisible by it).
        gpt_width: the residual stream's width (``gpt``).
        lstm_layers: stacked LSTM layers (``lstm``).
        lstm_hidden: LSTM units (``lstm``).
        lstm_embed: embedding width (``lstm``).
        eval_tokens: validation tokens scored at each evaluation, from the split's start
            (null: all of them).
        sample_prompts: prompts of the sample texts written at each evaluation.
        sample_tokens: tokens of each sample text.
        sample_temperature: softmax temperature of the samples (0: the most likely token).
    """

    arch: Literal["gpt", "lstm"] = "gpt"
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    context: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    gpt_layers: int = Field(4, ge=1)
    gpt_heads: int = Field(4, ge=1)
    gpt_width: int = Field(128, ge=1)
    lstm_layers: int = Field(2, ge=1)
    lstm_hidden: int = Field(256, ge=1)
    lstm_embed: int = Field(128, ge=1)
    eval_tokens: int | None = Field(None, ge=1)
    sample_prompts: list[str] = Field(default_factory=lambda: ["\n"])
    sample_tokens: int = Field(200, ge=0)
    sample_temperature: float = Field(1.0, ge=0)


def hparams_of(spec, cfg: LMConfig) -> dict[str, Any]:
    """The architecture a config describes, for the vocabulary of ``spec`` (a ``TextSpec``)."""
    if cfg.arch == "gpt":
        return {
            "arch": "gpt",
            "vocab_size": spec.vocab_size,
            "context": cfg.context,
            "layers": cfg.gpt_layers,
            "heads": cfg.gpt_heads,
            "width": cfg.gpt_width,
            "dropout": cfg.dropout,
        }
    return {
        "arch": "lstm",
        "vocab_size": spec.vocab_size,
        "embed": cfg.lstm_embed,
        "hidden": cfg.lstm_hidden,
        "layers": cfg.lstm_layers,
        "dropout": cfg.dropout,
    }


def check(spec, cfg: LMConfig, stage: str | None = None) -> None:
    """Refuses settings the data cannot serve, before any training.

    Raises:
        ValueError: a context longer than the data's rows, heads that do not divide the
            width, or a sample prompt the vocabulary cannot encode (each says which).
    """
    from components.text.tokenizer import Tokenizer

    where = f" (stage {stage!r})" if stage else ""
    if cfg.context > spec.block_tokens:
        raise ValueError(
            f"context {cfg.context} is longer than the rows of the text dataset{where}: "
            f"block_tokens {spec.block_tokens}; lower context or prepare longer blocks"
        )
    if cfg.arch == "gpt" and cfg.gpt_width % cfg.gpt_heads:
        raise ValueError(f"gpt_width {cfg.gpt_width} is not divisible by gpt_heads {cfg.gpt_heads}")
    tokenizer = Tokenizer.from_json(spec.tokenizer)
    for prompt in cfg.sample_prompts:
        if not tokenizer.encode(prompt) or tokenizer.unknown(prompt):
            raise ValueError(
                f"sample prompt {prompt!r} is empty or has characters the vocabulary of the "
                f"text dataset{where} lacks: {tokenizer.unknown(prompt)}"
            )


# --- the per-worker loop ------------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    """Trains on random windows of this worker's shard of ``train``; evaluates on ``val`` and
    writes sample texts every ``steps_per_epoch`` steps; the last checkpoint holds the best
    evaluation's weights (lowest validation loss)."""
    import ray.train
    import torch

    from components import training
    from components.text import common
    from components.text.models import build_lm, sample
    from components.text.tokenizer import Tokenizer

    loop = training.loop_of(config)
    cfg = loop.settings(LMConfig)
    spec = loop.data
    check(spec, cfg)
    dev = training.device()
    rank, _ = training.world()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = training.start_from(build_lm(hparams_of(spec, cfg)), loop).to(dev)
    blocks = full_blocks(common.shard_rows("train", ("ids",))["ids"], spec.block_tokens, rank)
    val = common.shard_rows("val", ("ids",))
    tokenizer = Tokenizer.from_json(spec.tokenizer)
    optimizer = common.optimizer_for(model, cfg.lr, cfg)
    scheduler = common.warmup_cosine(optimizer, cfg.epochs * cfg.steps_per_epoch, cfg)

    # Resume: after a worker failure (or a rerun of the stage) continue from the last epoch.
    state = training.restore()
    start_epoch, history, samples, resumed_from = 0, [], [], None
    best = {"value": None, "epoch": -1, "model": training.cpu_state_dict(model)}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        samples, resumed_from = state["samples"], start_epoch
    model = ray.train.torch.prepare_model(model)  # DDP across workers (gloo or NCCL)

    def snapshot(epoch: int) -> dict[str, Any]:
        """What a restart needs to continue after ``epoch`` (tensors and plain data only)."""
        return {
            "epoch": epoch,
            "model": training.cpu_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "samples": samples,
            "best": best,
            "resumed_from": resumed_from,
            "config": loop.config,
        }

    for epoch in range(start_epoch, cfg.epochs):
        started, cpu_started = time.time(), time.process_time()
        model.train()
        # Windows drawn from (seed, rank, epoch): a resumed epoch draws the same ones.
        draws = torch.Generator().manual_seed(hash((cfg.seed, rank, epoch)) % 2**62)
        loss_sum = 0.0
        for _ in range(cfg.steps_per_epoch):
            x, y = windows(blocks, cfg.batch_size, cfg.context, draws)
            x, y = x.to(dev), y.to(dev)
            with training.autocast(dev, cfg.precision):
                logits, _ = model(x)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            common.step(model, optimizer, scheduler, loss, cfg.grad_clip)
            loss_sum += float(loss.detach())
        seconds = max(time.time() - started, 1e-9)
        cpu_seconds = time.process_time() - cpu_started
        (loss_sum,) = training.all_reduce_sum([loss_sum / cfg.steps_per_epoch], dev)
        windows_seen = cfg.steps_per_epoch * cfg.batch_size * training.world()[1]
        plain = training.unwrap(model)
        scores = evaluate(plain, val, cfg.context, dev, cfg.precision, cfg.eval_tokens)
        metrics = {
            "epoch": epoch,
            "train/steps": (epoch + 1) * cfg.steps_per_epoch,
            "train/loss": loss_sum / training.world()[1],
            "train/samples_per_s": windows_seen / seconds,
            "train/tokens_per_s": windows_seen * cfg.context / seconds,
            "train/cpu_s": cpu_seconds,  # this worker's CPU time in the steps (not evaluation)
            "val/loss": scores["loss"],
            "val/bpc": bits_per_char(scores["loss"], spec.chars_per_token["val"]),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        if rank == 0:  # the texts go into the checkpoint rank 0 saves
            for prompt in cfg.sample_prompts:
                ids = sample(
                    plain,
                    tokenizer.encode(prompt),
                    cfg.sample_tokens,
                    cfg.sample_temperature,
                    seed=cfg.seed,
                )
                samples.append({"epoch": epoch, "prompt": prompt, "text": tokenizer.decode(ids)})
        if best["value"] is None or metrics["val/loss"] < best["value"]:
            best = {"value": metrics["val/loss"], "epoch": epoch}
            best["model"] = training.cpu_state_dict(model)
        training.report(metrics, snapshot(epoch), loop.progress)

    final = training.final_state(snapshot(cfg.epochs - 1), model)
    training.report({"epoch": cfg.epochs - 1, "completed": True}, final)


def full_blocks(ids: tuple, block_tokens: int, rank: int = 0):
    """The rows of flat ids + offsets that hold a whole block (``block_tokens`` + 1 ids), as
    one (R, block_tokens + 1) tensor: every training window lies inside one row.

    Raises:
        ValueError: no whole row (a split too small for this many workers).
    """
    import numpy as np
    import torch

    flat, offsets = ids
    lengths = np.diff(offsets)
    whole = np.flatnonzero(lengths == block_tokens + 1)
    if not len(whole):
        raise ValueError(
            f"the train shard of rank {rank} holds no block of {block_tokens + 1} tokens: "
            "more text, smaller block_tokens or fewer workers"
        )
    return torch.as_tensor(np.stack([flat[offsets[r] : offsets[r + 1]] for r in whole]))


def windows(blocks, batch_size: int, context: int, generator):
    """``batch_size`` random windows of ``context`` inputs and their next-token targets."""
    import torch

    rows = torch.randint(len(blocks), (batch_size,), generator=generator)
    starts = torch.randint(blocks.shape[1] - context, (batch_size,), generator=generator)
    span = blocks[rows[:, None], starts[:, None] + torch.arange(context + 1)[None]]
    return span[:, :-1], span[:, 1:]


def evaluate(module, rows: dict, context: int, dev, precision: str = "fp32", limit=None) -> dict:
    """Mean loss (nats per token) over every token of a split, read in consecutive windows of
    ``context`` inputs within each row (or its first ``limit`` tokens), in order: every rank
    (and the test scoring) gets the same exact number."""
    import torch

    from components import training

    flat, offsets = rows["ids"]
    spans = []  # (start in flat, inputs), targets one to the right
    for r in range(len(offsets) - 1):
        for s in range(int(offsets[r]), int(offsets[r + 1]) - 1, context):
            spans.append((s, min(context, int(offsets[r + 1]) - 1 - s)))
    if limit is not None:
        kept, total = [], 0
        for span in spans:
            if total >= limit:
                break
            kept.append(span)
            total += span[1]
        spans = kept
    data = torch.as_tensor(flat)
    module.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        full = [s for s, n in spans if n == context]
        groups = [full[i : i + 64] for i in range(0, len(full), 64)]
        groups += [[s] for s, n in spans if n != context]  # the short tails, one at a time
        lengths = {s: n for s, n in spans}
        for group in groups:
            n = lengths[group[0]]
            idx = torch.as_tensor(group)[:, None] + torch.arange(n + 1)[None]
            span = data[idx].to(dev)
            with training.autocast(dev, precision):
                logits, _ = module(span[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), span[:, 1:].flatten(), reduction="sum"
            )
            loss_sum += float(loss)
            count += span[:, 1:].numel()
    return {"loss": loss_sum / max(count, 1), "tokens": count}


def bits_per_char(loss: float, chars_per_token: float) -> float:
    """Bits per character from nats per token (exact for characters; for BPE through the
    split's characters per token)."""
    return loss / math.log(2) / max(chars_per_token, 1e-12)


# --- the stage ----------------------------------------------------------------------------


class LanguageModelStage(Component):
    """Trains a GPT or LSTM language model on a prepared text dataset (Ray Train, DDP)."""

    version = "1"
    Config = LMConfig
    produces = "model/lm"
    trainable = "components.text.tuning:LM"

    def run(self, ctx: StageContext, config: LMConfig) -> dict[str, Any]:
        import torch

        from components import training
        from components.text.models import build_lm

        data = prepare(ctx)
        check(data.spec, config, data.data_stage)
        result = training.fit(train_func, config, ctx, data)
        state = result.state
        hparams = hparams_of(data.spec, config)
        weights = state["best"]["model"]
        scores = test_scores(load(weights, hparams, data, config), data.data_dir)
        torch.manual_seed(config.seed)  # the weights training started from
        untrained = build_lm(hparams)
        init = test_scores(
            load(training.cpu_state_dict(untrained), hparams, data, config), data.data_dir
        )
        save(ctx.out_dir, weights, hparams, data, config, scores)
        write_samples(ctx.out_dir / SAMPLES_FILE, state["samples"])
        return {
            **scores,
            "test/loss_init": init["test/loss"],
            "data/ln_vocab": math.log(data.spec.vocab_size),
            "best_epoch": state["best"]["epoch"],
            "best/val_metric": state["best"]["value"],
            "parameters": sum(p.numel() for p in untrained.parameters()),  # tied counted once
            **result.summary(),
        }


def write_samples(path: Path, samples: list[dict]) -> None:
    """The sample texts of every evaluation, as plain text (the HTML report shows it)."""
    parts = [
        f"=== epoch {s['epoch']}, prompt {s['prompt']!r}\n{s['prompt']}{s['text']}\n"
        for s in samples
    ]
    path.write_text("\n".join(parts))


# --- the family's data, bundle and scores (also used by tuning.py) --------------------------


def prepare(ctx: StageContext) -> TrialData:
    """The text dataset in ``needs:`` (prepared for language modelling): train and val, read lazily,
    and its ``TextSpec``."""
    from components.text.prepare import read_text_dataset

    return read_text_dataset(ctx, "text.lm", TASK)


def describe(hparams: dict, data: TrialData, config: LMConfig, metrics: dict):
    """The bundle of a language model of ``data``'s tokens (no weights yet)."""
    from components.bundle import Bundle

    return Bundle(
        component="text.lm",
        kind="model/lm",
        loader="components.text.inference:load_lm",
        input=data.spec.input_spec(),
        output={"type": "tokens", "vocab_size": data.spec.vocab_size},
        hparams=hparams,
        config=config.model_dump(mode="json"),
        metrics=metrics,
        meta={
            "tokenizer": data.spec.tokenizer,
            "chars_per_token": data.spec.chars_per_token,
        },
    )


def load(weights, hparams: dict, data: TrialData, config):
    """The inference object of weights in memory (as ``bundle.load_model`` would build it)."""
    from components.text.common import loaded

    return loaded(describe(hparams, data, config, {}), weights)


def save(out_dir: Path, weights, hparams: dict, data: TrialData, config, metrics: dict) -> None:
    """Writes the model's bundle (``bundle.json``, ``weights.pt``) into ``out_dir``."""
    from components.bundle import save_bundle

    save_bundle(out_dir, describe(hparams, data, config, metrics), {"model": weights})


def test_scores(model, data_dir: Path, split: str = "test") -> dict[str, Any]:
    """Loss (nats per token), bits per character and perplexity of a loaded language model on
    a split of a text dataset, read in windows of its training context (one thread: the same
    bits in the stage, a search's export and a gate)."""
    from components.text.common import one_thread, table_rows
    from components.text.prepare import load_split

    rows = table_rows(load_split(data_dir, split), ("ids",))
    context = model.bundle.config["context"]
    with one_thread():
        result = evaluate(model.module, rows, context, "cpu")
    chars_per_token = model.bundle.meta["chars_per_token"][split]
    return {
        f"{split}/loss": result["loss"],
        f"{split}/bpc": bits_per_char(result["loss"], chars_per_token),
        f"{split}/perplexity": math.exp(min(result["loss"], 50.0)),
        f"{split}/tokens": result["tokens"],
    }
