"""vision.train figures, as JSON: throughput against plain PyTorch, scaling, accuracy vs SVC.

    .venv/bin/python benchmarks/train.py [--epochs 6] [--rounds 3]

1. Throughput: ``vision.train`` with 1 worker against a plain PyTorch loop over the same
   model, the same data (in memory) and batch size, in this process. Both use one CPU thread
   (a Ray worker holding 1 CPU runs torch with one thread). Samples/s after the first epoch
   (warm-up). The two sides alternate in ``--rounds`` rounds (a new seed each, so the stage
   trains again); the ratio's min, median and max over rounds. Goal: median at least 0.95.
2. ``vision.train`` with 2 workers against 1 (samples/s, same epochs).
3. Test accuracy of the demo config against scikit-learn's SVC(gamma=0.001) trained and scored
   on the same split of the same digits. Goal: at least equal.
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

from pipelines import engine, spec  # noqa: E402

PREPARE = """\
  prepare:
    uses: data.prepare
    with:
      augment: {copies: 2, rotate: 10, shift: 0.1, zoom: 0.1, seed: 0}
"""


def run_stage(storage: Path, train_with: str, resources: str) -> dict:
    path = storage.parent / "bench.yaml"
    path.write_text(
        f"name: bench-train\nstorage: {storage}\nstages:\n{PREPARE}"
        f"  classifier:\n    uses: vision.train\n    needs: [prepare]\n"
        f"    resources: {resources}\n    with: {train_with}\n"
    )
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.ok, record.error
    return record.stages


def history(stage: dict) -> list[dict]:
    path = Path(stage.artifact) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def plain_pytorch(data_dir: Path, cfg: dict, epochs: int, seed: int = 0) -> list[float]:
    """The same model, optimizer and batch size in a plain loop over in-memory tensors."""
    import torch
    from torch import nn

    from components.data.dataset import load_dataset_info, load_numpy
    from components.vision.model import Classifier

    torch.set_num_threads(1)
    info = load_dataset_info(data_dir)
    x, y = load_numpy(data_dir, "train")
    x, y = torch.from_numpy(x.copy()), torch.from_numpy(y)
    c, h, w = info.image_shape
    torch.manual_seed(seed)
    model = Classifier(c, info.num_classes, (h, w), cfg["width"], cfg["depth"])
    optimizer = torch.optim.AdamW(model.parameters(), cfg["lr"], weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    rates = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(y))
        for i in range(0, len(y), cfg["batch_size"]):
            idx = order[i : i + cfg["batch_size"]]
            loss = criterion(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(len(y) / (time.perf_counter() - start))
    return rates


def svc_accuracy(data_dir: Path) -> float:
    """SVC(gamma=0.001) on the raw digits, with exactly the artifact's train/test rows."""
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from components.data.dataset import load_dataset_info

    info = load_dataset_info(data_dir)
    digits = load_digits()

    def rows(split: str, originals_only: bool):
        tables = [pq.read_table(p, columns=["row_id", "copy"]) for p in info.shard_paths(split)]
        ids = [
            rid
            for t in tables
            for rid, copy in zip(t["row_id"].to_pylist(), t["copy"].to_pylist(), strict=True)
            if copy == 0 or not originals_only
        ]
        return digits.data[ids], digits.target[ids]

    x_train, y_train = rows("train", originals_only=True)
    x_test, y_test = rows("test", originals_only=True)
    return float(SVC(gamma=0.001).fit(x_train, y_train).score(x_test, y_test))


def past_warmup(rates: list[float]) -> float:
    """Mean samples/s of the epochs after the first."""
    return sum(rates[1:]) / len(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up, not measured")
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    cfg = {"epochs": args.epochs, "batch_size": 64, "lr": 3e-3, "width": 16, "depth": 2}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp) / "store"
        ones, ratios = [], []
        for seed in range(args.rounds):
            train_with = json.dumps({**cfg, "seed": seed})
            ones.append(run_stage(storage, train_with, "{workers: 1, cpus_per_worker: 1}"))
            data_dir = Path(ones[-1]["prepare"].artifact)
            plain = past_warmup(plain_pytorch(data_dir, cfg, args.epochs, seed))
            ours = past_warmup([h["train/samples_per_s"] for h in history(ones[-1]["classifier"])])
            ratios.append((ours, plain))
        two = run_stage(storage, json.dumps(cfg), "{workers: 2, cpus_per_worker: 1}")
        demo = spec.load(ROOT / "pipelines" / "demo.yaml", [f"storage={storage}"])
        demo_cfg = demo.stages["classifier"].config.model_dump(mode="json")
        demo_res = demo.stages["classifier"].spec.resources.model_dump(mode="json")
        demo_run = run_stage(storage, json.dumps(demo_cfg), json.dumps(demo_res))
        svc = svc_accuracy(data_dir)
        rates_2 = [h["train/samples_per_s"] for h in history(two["classifier"])]
    ray.shutdown()

    each = [ours / plain for ours, plain in ratios]
    ray_1 = statistics.median(ours for ours, _ in ratios)
    plain_rate = statistics.median(plain for _, plain in ratios)
    ray_2 = past_warmup(rates_2)
    ours = demo_run["classifier"].metrics["test/accuracy"]
    print(
        json.dumps(
            {
                "throughput": {
                    "vision_train_1_worker_samples_per_s": round(ray_1, 1),
                    "plain_pytorch_samples_per_s": round(plain_rate, 1),
                    "ratio_min": round(min(each), 3),
                    "ratio_median": round(statistics.median(each), 3),
                    "ratio_max": round(max(each), 3),
                    "rounds": args.rounds,
                    "goal_median_ratio_at_least": 0.95,
                },
                "scaling": {
                    "vision_train_2_workers_samples_per_s": round(ray_2, 1),
                    "ratio_2_vs_1_workers": round(ray_2 / ray_1, 3),
                    "cpus": os.cpu_count(),
                },
                "accuracy": {
                    "demo_config_test_accuracy": round(ours, 4),
                    "svc_gamma_0.001_test_accuracy": round(svc, 4),
                    "difference": round(ours - svc, 4),
                    "goal_at_least_svc": True,
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
