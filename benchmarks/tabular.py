"""tabular.mlp figures, as JSON: test R^2 against scikit-learn on the same split, the Ray Train
loop's samples/s against the same loop in plain PyTorch, and (optionally) data.prepare of a
table of millions of rows with a 1 GiB object store.

    .venv/bin/python benchmarks/tabular.py                          # R^2 and throughput
    .venv/bin/python benchmarks/tabular.py --rounds 5 --epochs 6     # more throughput rounds
    .venv/bin/python benchmarks/tabular.py --large-rows 2000000      # plus the 2M-row table
    .venv/bin/python benchmarks/tabular.py --rounds 0 --skip-r2 --large-rows 2000000  # alone

1. R^2: the ``table`` and ``mlp`` stages of ``pipelines/tabular.yaml`` exactly as shipped
   (RAND HIE from statsmodels, target ``mdvis``), one run. scikit-learn's ``Ridge`` and
   ``HistGradientBoostingRegressor`` (defaults, ``random_state=0``) fit the same train rows
   and score the same test rows, with the same inputs the MLP gets: numeric features filled
   with the train median and normalized as the shards hold them, categories as their codes
   (one-hot for Ridge, native categories for the boosted trees). Goal: above Ridge and within
   0.02 of gradient boosting.
2. Throughput: ``tabular.mlp`` with 1 worker (1 CPU: torch runs one thread) against a plain
   PyTorch loop over the same model, optimizer, batch size and in-memory tensors in this
   process (one thread), interleaved in rounds (plain, then Ray, each ``--epochs`` epochs; a
   fresh seed per round so no stage is a cache hit). Samples/s of the training batches after
   the first epoch; ratio per round, min/median/max. Goal: ratio at least 0.9.
3. ``--large-rows N``: a CSV of N rows (numeric, categorical and missing values, a regression
   target) through ``data.prepare`` in a child process whose Ray has a 1 GiB object store.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import spread  # noqa: E402

PIPELINE = ROOT / "pipelines" / "tabular.yaml"


def run_stages(storage: Path, model_with: dict | None = None) -> dict:
    """Runs the ``table`` and ``mlp`` stages of pipelines/tabular.yaml (``model_with``
    replaces the model's settings) on ``storage``; returns the record's stages."""
    import yaml

    from pipelines import engine, spec

    doc = yaml.safe_load(PIPELINE.read_text())
    stages = {name: doc["stages"][name] for name in ("table", "mlp")}
    if model_with is not None:
        stages["mlp"] = {**stages["mlp"], "with": model_with}
    path = storage.parent / "bench-tabular.yaml"
    path.write_text(
        yaml.safe_dump({"name": "bench-tabular", "storage": str(storage), "stages": stages})
    )
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.ok, record.error
    return record.stages


def history(artifact: str) -> list[dict]:
    lines = (Path(artifact) / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def encoded(data_dir: Path, split: str):
    """(numeric inputs, category codes, target in its own units) of a split, as the MLP gets
    them (``TableSpec.encode_shard``), shard by shard in the listed order."""
    import numpy as np
    import pyarrow.parquet as pq

    from components.data.dataset import load_dataset_info
    from components.data.table import TableSpec

    info = load_dataset_info(data_dir)
    spec = TableSpec.of(info)
    parts = []
    for path in info.shard_paths(split):
        table = pq.read_table(path)
        x_num, x_cat = spec.encode_shard(table)
        parts.append((x_num, x_cat, table.column(spec.label_column).to_numpy()))
    return spec, *(np.concatenate(p) for p in zip(*parts, strict=True))


def sklearn_r2(data_dir: Path) -> dict[str, float]:
    """Test R^2 of Ridge and HistGradientBoostingRegressor on the artifact's own split."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge

    spec, num_tr, cat_tr, y_tr = encoded(data_dir, "train")
    _, num_te, cat_te, y_te = encoded(data_dir, "test")
    cards = spec.cardinalities()

    def one_hot(cat):
        return np.concatenate([np.eye(n)[cat[:, i]] for i, n in enumerate(cards)], axis=1)

    ridge = Ridge().fit(np.hstack([num_tr, one_hot(cat_tr)]), y_tr)
    r2_ridge = ridge.score(np.hstack([num_te, one_hot(cat_te)]), y_te)
    categorical = [False] * num_tr.shape[1] + [True] * cat_tr.shape[1]
    gbdt = HistGradientBoostingRegressor(categorical_features=categorical, random_state=0)
    gbdt.fit(np.hstack([num_tr, cat_tr]), y_tr)
    r2_gbdt = gbdt.score(np.hstack([num_te, cat_te]), y_te)
    return {"ridge": float(r2_ridge), "hist_gradient_boosting": float(r2_gbdt)}


def plain_pytorch(data_dir: Path, settings: dict, epochs: int, seed: int) -> list[float]:
    """The stage's training loop without Ray: the same model, AdamW, cosine schedule, batch
    size, seeded shuffles and loss, over in-memory tensors, one thread. Samples/s per epoch
    (training batches only, as the stage reports ``train/samples_per_s``)."""
    import torch
    import torch.nn.functional as F

    from components.tabular.mlp import MLPConfig, build_model

    torch.set_num_threads(1)
    cfg = MLPConfig.model_validate({**settings, "epochs": epochs, "seed": seed})
    spec, x_num, x_cat, y = encoded(data_dir, "train")
    x_num, x_cat = torch.as_tensor(x_num), torch.as_tensor(x_cat)
    target = torch.as_tensor(spec.standardize_target(y))
    torch.manual_seed(cfg.seed)
    model = build_model(spec, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    rates, n = [], len(target)
    for epoch in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for lo in range(0, n - 1, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            loss = F.mse_loss(model(x_num[idx], x_cat[idx])[:, 0], target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(n / (time.perf_counter() - start))
        scheduler.step()
    return rates


def throughput(storage: Path, data_dir: Path, rounds: int, epochs: int) -> dict:
    """Interleaved rounds of the plain loop and the stage (1 worker, fresh seed each)."""
    import yaml

    settings = yaml.safe_load(PIPELINE.read_text())["stages"]["mlp"]["with"]
    settings = {**settings, "early_stopping": None, "epochs": epochs}
    plain_rates, ray_rates, ratios = [], [], []
    for r in range(rounds):
        plain = statistics.mean(plain_pytorch(data_dir, settings, epochs, seed=100 + r)[1:])
        stages = run_stages(storage, {**settings, "seed": 100 + r})
        points = history(stages["mlp"].artifact)
        ours = statistics.mean(p["train/samples_per_s"] for p in points[1:])
        plain_rates.append(plain)
        ray_rates.append(ours)
        ratios.append(ours / plain)

    return {
        "rounds": rounds,
        "epochs_per_run": epochs,
        "train_rows": len(encoded(data_dir, "train")[3]),
        "tabular_mlp_1_worker_samples_per_s": spread(ray_rates, 1),
        "plain_pytorch_samples_per_s": spread(plain_rates, 1),
        "ratio": spread(ratios, 3),
        "goal_ratio_at_least": 0.9,
    }


def write_large_csv(path: Path, rows: int, seed: int = 0) -> None:
    """A regression table of ``rows`` rows: 6 numeric features (1% missing), 2 categories,
    ``y`` a noisy function of them; written in blocks so that memory stays small."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    block = 250_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        x = rng.normal(size=(n, 6)).round(5)
        city = rng.integers(0, 50, n)
        shop = rng.integers(0, 8, n)
        y = x @ np.arange(1, 7) + 0.3 * city - shop + rng.normal(size=n)
        frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(6)])
        frame.loc[rng.random(n) < 0.01, "x0"] = np.nan
        frame["city"] = [f"c{c}" for c in city]
        frame["shop"] = [f"s{s}" for s in shop]
        frame["y"] = y.round(5)
        frame.to_csv(path, mode="w" if start == 0 else "a", header=start == 0, index=False)


def run_large(args: argparse.Namespace) -> dict:
    """data.prepare of the large CSV on a Ray whose object store holds 1 GiB (child)."""
    import ray

    from components.data.config import PrepareConfig
    from components.data.prepare import prepare

    ray.init(
        address="local",
        num_cpus=args.cpus,
        object_store_memory=1 << 30,
        include_dashboard=False,
        logging_level="WARNING",
    )
    config = PrepareConfig.model_validate(
        {
            "source": {
                "kind": "csv",
                "paths": [args.large_csv],
                "task": "regression",
                "label_column": "y",
                "categorical_columns": ["city", "shop"],
                "impute": "median",
            },
            "split": {"val": 0.1, "test": 0.1, "seed": 0},
        }
    )
    start = time.perf_counter()
    metrics = prepare(config, Path(args.out))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"seconds": round(seconds, 1), "metrics": metrics}


def large(rows: int, cpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "large.csv"
        write_large_csv(csv, rows)
        cmd = [sys.executable, __file__, "--child-large", str(csv), "--out", f"{tmp}/out"]
        cmd += ["--cpus", str(cpus)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return {"rows": rows, "ok": False, "error": done.stderr.strip().splitlines()[-3:]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        metrics = result["metrics"]
        return {
            "rows": rows,
            "csv_bytes": csv.stat().st_size,
            "object_store_bytes": 1 << 30,
            "ok": True,
            "seconds": result["seconds"],
            "rows_in": metrics.get("data/rows_in"),
            "rows_out": {s: metrics.get(f"{s}/rows") for s in ("train", "val", "test")},
            "quarantined": metrics.get("data/quarantined"),
            "duplicates_removed": metrics.get("data/duplicates_removed"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--skip-r2", action="store_true")
    parser.add_argument("--large-rows", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--child-large", dest="large_csv", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.large_csv:
        print(json.dumps(run_large(args)))
        return

    result: dict = {}
    if not args.skip_r2 or args.rounds:
        import ray

        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        with tempfile.TemporaryDirectory() as tmp:
            storage = Path(tmp) / "store"
            stages = run_stages(storage)
            data_dir = Path(stages["table"].artifact)
            if not args.skip_r2:
                metrics = stages["mlp"].metrics
                baselines = sklearn_r2(data_dir)
                ours = metrics["test/r2"]
                result["r2"] = {
                    "dataset": "statsmodels randhie, target mdvis",
                    "test_rows": metrics["test/rows"],
                    "tabular_mlp_test_r2": round(ours, 4),
                    "tabular_mlp_test_rmse": round(metrics["test/rmse"], 4),
                    "tabular_mlp_best_epoch": metrics["best_epoch"],
                    "ridge_test_r2": round(baselines["ridge"], 4),
                    "hist_gradient_boosting_test_r2": round(baselines["hist_gradient_boosting"], 4),
                    "minus_ridge": round(ours - baselines["ridge"], 4),
                    "minus_gradient_boosting": round(ours - baselines["hist_gradient_boosting"], 4),
                    "goal": "above ridge, within 0.02 of gradient boosting",
                }
            if args.rounds:
                result["throughput"] = throughput(storage, data_dir, args.rounds, args.epochs)
        ray.shutdown()
    if args.large_rows:
        result["large_table"] = large(args.large_rows, args.cpus)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
