"""tune.search figures, as JSON: ASHA against running every sampled config to completion.

    .venv/bin/python benchmarks/tune.py [--samples 12] [--epochs 6] [--val 0.2]

Both searches run in one pipeline run, one after the other, on the same prepared digits, with
the same space, samples and seed (so the same configs are sampled: checked below). Reported:
the best validation accuracy each found and the training epochs each ran.
Goal: ASHA within 0.5 points of the exhaustive best with at most half the epochs.

The validation split is 20% of the digits (360 rows) by default: on the pipelines' usual 10%
(180 rows) one row is 0.56 points, so a 0.5-point comparison would be below what the split can
tell apart. ``one_row_points`` in the output says what one row is worth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import engine, spec  # noqa: E402

SEARCH = """\
    uses: tune.search
    resources: {{workers: 1, cpus_per_worker: 1}}
    with:
      train: {{epochs: {epochs}, width: 16, batch_size: 64}}
      samples: {samples}
      seed: 0
      grace_period: 1
      reduction_factor: 3
      space:
        lr: {{loguniform: [1.0e-5, 3.0e-2]}}
        dropout: {{uniform: [0.0, 0.5]}}
"""

PIPELINE = """\
name: bench-tune
storage: {storage}
stages:
  prepare:
    uses: data.prepare
    with:
      augment: {{copies: 1, rotate: 10, shift: 0.1, seed: 0}}
      split: {{val: {val}, test: 0.2, seed: 0}}
  asha:
    needs: [prepare]
{search}      scheduler: asha
  exhaustive:
    needs: [prepare, asha]          # after ASHA, so the two never share the CPUs
{search}      scheduler: fifo
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)  # as pipelines/search.yaml
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--val", type=float, default=0.2, help="validation fraction")
    args = parser.parse_args()
    import pandas as pd
    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,  # stdout is the JSON alone
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(
            PIPELINE.format(
                storage=Path(tmp) / "store",
                val=args.val,
                search=SEARCH.format(samples=args.samples, epochs=args.epochs),
            )
        )
        started = time.time()
        record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
        assert record.ok, record.error
        figures: dict = {"samples": args.samples, "max_epochs": args.epochs, "cpus": os.cpu_count()}
        val_rows = record.stages["prepare"].metrics.get("val/rows")
        figures.update(val_rows=val_rows, one_row_points=100 / val_rows if val_rows else None)
        tables = {}
        for name in ("asha", "exhaustive"):
            stage = record.stages[name]
            metrics = stage.metrics
            tables[name] = pd.read_parquet(Path(stage.artifact) / "results.parquet")
            figures[name] = {
                "best_val_accuracy": metrics["best/val/accuracy"],
                "best_test_accuracy": metrics["test/accuracy"],
                "epochs": metrics["epochs_run"],
                "trials_stopped_early": metrics["trials_stopped_early"],
                "seconds": metrics["search_seconds"],
            }
    same = sorted(tables["asha"]["config/lr"].round(12)) == sorted(
        tables["exhaustive"]["config/lr"].round(12)
    )
    asha, full = figures["asha"], figures["exhaustive"]
    gap = 100 * (full["best_val_accuracy"] - asha["best_val_accuracy"])
    ratio = asha["epochs"] / full["epochs"]
    figures.update(
        same_sampled_configs=same,
        gap_points=round(gap, 3),
        epoch_ratio=round(ratio, 3),
        goal_met=bool(same and gap <= 0.5 and ratio <= 0.5),
        wall_seconds=round(time.time() - started, 1),
    )
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
