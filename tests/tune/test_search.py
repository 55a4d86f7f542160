"""tune.search on real Ray Tune + Train: ASHA, grid, failing trials, Optuna; spec checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pipeline_helpers import run_ok as run

from components.api import Resources
from components.tune.search import concurrent_trials
from pipelines import engine, spec

ROOT = Path(__file__).resolve().parents[2]

PREPARE = """\
  prepare:
    uses: data.prepare
    with:
      split: {val: 0.1, test: 0.2, seed: 0}
"""


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One storage for the module: the digits are prepared once, then cached."""
    return tmp_path_factory.mktemp("tune") / "store"


def pipeline(storage: Path, search_with: str, extra: str = "") -> spec.Pipeline:
    path = storage.parent / f"p-{abs(hash(search_with + extra))}.yaml"
    path.write_text(
        f"name: tune-test\nstorage: {storage}\nstages:\n{PREPARE}"
        "  search:\n    uses: tune.search\n    needs: [prepare]\n"
        "    resources: {workers: 1, cpus_per_worker: 1}\n"
        f"    with:\n{search_with}{extra}"
    )
    return spec.load(path)


def table(record) -> pd.DataFrame:
    art = Path(record.stages["search"].artifact)
    parquet = pd.read_parquet(art / "results.parquet")
    assert len(pd.read_csv(art / "results.csv")) == len(parquet)
    return parquet


# Trials run one at a time in grid order, so ASHA's cut is deterministic: the good first trial
# sets each milestone, and the trials with a tiny learning rate fall below it after one epoch.
ASHA = """\
      train: {epochs: 3, width: 8, batch_size: 64}
      search: grid
      scheduler: asha
      reduction_factor: 2
      max_concurrent_trials: 1
      space: {lr: {grid: [1.0e-2, 1.0e-5, 3.0e-5]}}
"""

GATE = """\
  gate:
    uses: tune.evaluate
    needs: [prepare, search]
    with: {register_as: tuned-digits}
"""


def test_asha_stops_poor_trials_and_the_best_is_exported_and_gated(ray_local, storage):
    from components.bundle import load_model
    from components.data.dataset import load_numpy

    record = run(pipeline(storage, ASHA, GATE))
    metrics = record.stages["search"].metrics
    rows = table(record)
    assert len(rows) == 3 and set(rows["status"]) <= {"completed", "stopped"}
    # ASHA cut poor trials short: fewer epochs than samples x epochs.
    assert rows["epochs_run"].sum() == metrics["epochs_run"] < 3 * 3, rows
    assert (rows["status"] == "stopped").sum() == metrics["trials_stopped_early"] >= 1
    best, worst = rows["best/val/accuracy"].max(), rows["best/val/accuracy"].min()
    assert best > worst + 0.1, rows[["trial", "config/lr", "best/val/accuracy"]]
    assert metrics["best/val/accuracy"] == pytest.approx(best)
    assert metrics["best/params"] == {"lr": 1e-2}

    # The artifact: best config, checkpoint, and a model that loads like vision.train's.
    art = Path(record.stages["search"].artifact)
    chosen = json.loads((art / "best_config.json").read_text())
    assert chosen["config"]["lr"] == pytest.approx(metrics["best/params"]["lr"])
    assert chosen["config"]["epochs"] == 3 and chosen["config"]["width"] == 8
    assert (art / "checkpoint" / "state.pt").is_file()
    model = load_model(art)
    x, y = load_numpy(Path(record.stages["prepare"].artifact), "test")
    accuracy = float((model.predict(x).numpy() == y).mean())
    assert accuracy == pytest.approx(metrics["test/accuracy"], abs=1e-9)
    assert accuracy > 0.8  # the best of the search learned the digits
    assert model.bundle.config["lr"] == pytest.approx(chosen["config"]["lr"])

    # tune.evaluate takes the search artifact; no champion yet, so it becomes champion.
    gate = record.stages["gate"].metrics
    assert gate["promoted"] and gate["test/accuracy"] == pytest.approx(accuracy, abs=1e-9)


GRID = """\
      train: {epochs: 2, width: 8, batch_size: 64, lr: 3.0e-3}
      search: grid
      scheduler: fifo
      space:
        width: {grid: [4, 8]}
        early_stopping: {grid: [null, {metric: val/no_such_metric, patience: 1}]}
"""


def test_grid_runs_exactly_the_grid_and_failing_trials_keep_their_error(ray_local, storage):
    record = run(pipeline(storage, GRID))
    metrics = record.stages["search"].metrics
    rows = table(record)
    assert len(rows) == metrics["trials"] == 4  # exactly the grid, once
    combos = set(zip(rows["config/width"], rows["config/early_stopping"], strict=True))
    assert {w for w, _ in combos} == {4, 8} and len(combos) == 4
    failed = rows[rows["status"] == "error"]
    assert len(failed) == metrics["trials_failed"] == 2
    assert failed["config/early_stopping"].notna().all()
    assert failed["error"].str.contains("val/no_such_metric").all(), failed["error"].tolist()
    finished = rows[rows["status"] == "completed"]
    assert len(finished) == 2 and (finished["epochs_run"] == 2).all()
    assert finished["config/early_stopping"].isna().all()
    assert set(metrics["errors"]) == set(failed["trial"])


def test_a_search_whose_trials_all_fail_fails_with_their_errors(ray_local, storage):
    bad = (
        "      train: {epochs: 1, width: 4, early_stopping: {metric: val/nope}}\n"
        "      search: grid\n      scheduler: fifo\n"
        "      space: {lr: {grid: [1.0e-3]}}\n"
    )
    record = engine.run_pipeline(pipeline(storage, bad), printer=lambda _line: None)
    assert not record.ok
    error = record.stages["search"].error
    assert "every trial of the search failed" in error and "val/nope" in error, error


def test_optuna_searches_with_tpe(ray_local, storage):
    optuna = (
        "      train: {epochs: 2, width: 8, batch_size: 64}\n"
        "      search: optuna\n      samples: 2\n      seed: 1\n"
        "      space: {lr: {loguniform: [1.0e-3, 1.0e-2]}, dropout: {uniform: [0.0, 0.3]}}\n"
    )
    record = run(pipeline(storage, optuna))
    rows = table(record)
    assert len(rows) == 2 and (rows["status"] != "error").all()
    assert rows["config/dropout"].between(0.0, 0.3).all()
    assert record.stages["search"].metrics["best/val/accuracy"] > 0.5


def test_a_time_budget_ends_the_search(ray_local, storage):
    budget = (
        "      train: {epochs: 1, width: 8, batch_size: 64}\n"
        "      samples: 12\n      max_concurrent_trials: 1\n      time_budget_s: 45\n"
        "      scheduler: fifo\n"
        "      space: {lr: {loguniform: [1.0e-3, 1.0e-2]}}\n"
    )
    record = run(pipeline(storage, budget))
    metrics = record.stages["search"].metrics
    rows = table(record)
    finished = rows[rows["status"] == "completed"]
    assert 1 <= len(finished) < 12, rows[["trial", "status", "epochs_run"]]
    assert metrics["epochs_run"] < 12
    assert metrics["search_seconds"] < 45 + 60  # the budget, plus stopping the last trial


def test_concurrent_trials_follow_the_cluster_and_the_trial_size():
    one = Resources(workers=1, cpus_per_worker=1)
    two = Resources(workers=2, cpus_per_worker=1)
    assert concurrent_trials(one, {"CPU": 2}, False) == 2
    assert concurrent_trials(two, {"CPU": 2}, False) == 1
    assert concurrent_trials(two, {"CPU": 3}, False) == 1
    assert concurrent_trials(two, {"CPU": 1}, False) == 1  # at least one
    assert concurrent_trials(Resources(workers=2, cpus_per_worker=2), {"CPU": 16}, False) == 4
    assert concurrent_trials(two, {"CPU": 64, "GPU": 4}, True) == 2


BAD_SPACES = [
    ("{lr: {loguniform: [1.0e-3, 1.0e-2]}, bogus: {choice: [1, 2]}}", "space.bogus", "unknown"),
    ("{lr: {uniform: [0.1, 0.01]}}", "space.lr", "lo < hi"),
    ("{lr: {normal: [0, 1]}}", "space.lr.normal", "unknown key"),
    ("{lr: {choice: []}}", "space.lr", "at least one value"),
    ("{width: {choice: [8, 0]}}", "space.width.choice", "greater than or equal to 1"),
    ("{lr: {choice: [0.1], grid: [0.2]}}", "space.lr", "exactly one"),
    ("{}", "space", "at least one key"),
]


@pytest.mark.parametrize(("space", "key", "problem"), BAD_SPACES)
def test_a_malformed_space_is_rejected_before_ray_starts(tmp_path, space, key, problem):
    """Validation runs in a fresh interpreter, which must not even import Ray."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"name: t\nstorage: {tmp_path}\nstages:\n{PREPARE}"
        "  search:\n    uses: tune.search\n    needs: [prepare]\n"
        f"    with:\n      space: {space}\n"
    )
    code = (
        "import sys\nfrom pipelines import spec\n"
        "try:\n    spec.load(sys.argv[1])\nexcept spec.PipelineError as e:\n    print(e)\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "ray imported: False" in out.stdout
    assert str(path) in out.stdout and f"stages.search.with.{key}" in out.stdout, out.stdout
    assert problem in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("with_", "key"),
    [
        ("{search: grid, space: {lr: {choice: [0.1]}}}", "stages.search.with.space"),
        ("{search: optuna, space: {lr: {grid: [0.1]}}}", "stages.search.with.space"),
        ("{metric: test/accuracy, space: {lr: {choice: [0.1]}}}", "stages.search.with.metric"),
        ("{trainable: data.prepare, space: {lr: {choice: [0.1]}}}", "with.trainable"),
        ("{train: {epochs: 0}, space: {lr: {choice: [0.1]}}}", "with.train.epochs"),
    ],
)
def test_search_settings_are_checked_against_the_trainable(tmp_path, with_, key):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"name: t\nstorage: {tmp_path}\nstages:\n{PREPARE}"
        f"  search: {{uses: tune.search, needs: [prepare], with: {with_}}}\n"
    )
    with pytest.raises(spec.PipelineError, match=key.replace(".", r"\.")):
        spec.load(path)
