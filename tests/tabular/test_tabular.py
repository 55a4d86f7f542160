"""tabular.mlp on real Ray Train: learning on diabetes, the target's scaling undone exactly by the
exported model, determinism, categories and missing values (unseen ones too), a killed worker.
Each behaviour is one Train run (determinism: a second run) on a table of a few hundred rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import run_ok as run
from tabular_helpers import diabetes_frame, pipeline, regression_source, shop_frame

from pipelines import spec

DIABETES = {"kind": "sklearn_diabetes"}
SMALL = {"epochs": 25, "batch_size": 32, "widths": [32, 16], "lr": 3.0e-3, "early_stopping": None}


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One storage for the module: the prepared tables are computed once and then cached."""
    return tmp_path_factory.mktemp("tabular") / "store"


def history(artifact: str) -> list[dict]:
    lines = (Path(artifact) / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_learns_diabetes_exports_in_the_targets_units_and_repeats_exactly(
    ray_local, storage, tmp_path
):
    from components.bundle import load_model

    record = run(spec.load(pipeline(storage, DIABETES, SMALL)))
    metrics = record.stages["model"].metrics
    data_dir = Path(record.stages["prepare"].artifact)
    test = pd.concat(pd.read_parquet(p) for p in sorted((data_dir / "test").glob("*.parquet")))
    val = pd.concat(pd.read_parquet(p) for p in sorted((data_dir / "val").glob("*.parquet")))
    train = pd.concat(pd.read_parquet(p) for p in sorted((data_dir / "train").glob("*.parquet")))

    # Learning: validation RMSE well below predicting the train mean.
    points = history(record.stages["model"].artifact)
    baseline = float(np.sqrt(np.mean((val["target"] - train["target"].mean()) ** 2)))
    best = min(p["val/rmse"] for p in points)
    assert best < 0.8 * baseline, (best, baseline)
    assert points[-1]["train/loss"] < 0.6 * points[0]["train/loss"]
    assert metrics["test/r2"] > 0.3 and metrics["test/rows"] == len(test)

    # The exported model, given the raw rows in their own units, predicts in the target's own
    # units: its RMSE on the test rows is the reported one, exactly.
    model = load_model(record.stages["model"].artifact)
    raw = diabetes_frame().iloc[test["row_id"].to_numpy()]
    predicted = model.predict(raw.drop(columns=["progression"]))
    truth = raw["progression"].to_numpy()
    assert np.array_equal(truth, test["target"].to_numpy())  # the shards keep its own units
    rmse = float(np.sqrt(np.mean((predicted - truth) ** 2)))
    assert rmse == metrics["test/rmse"]
    dataset = json.loads((data_dir / "dataset.json").read_text())
    scaling = dataset["target_normalization"]
    assert scaling["mean"] == pytest.approx(train["target"].mean(), rel=1e-12)
    assert model.bundle.output["mean"] == scaling["mean"] != 0
    assert model.bundle.output["scale"] == scaling["scale"] != 1
    # Row dicts work as well as a DataFrame; the standardized outputs are not the prediction.
    # (float32 sums differ in the last bits between batch sizes: compare batches of 3)
    head = raw.drop(columns=["progression"]).head(3)
    rows = head.to_dict("records")
    assert np.array_equal(model.predict(rows), model.predict(head))
    np.testing.assert_allclose(model.predict(rows), predicted[:3], rtol=1e-5)
    assert abs(model.outputs(*model.spec.encode_rows(rows)).mean()) < 5
    for name in ("residuals.png", "predicted_vs_true.png"):
        assert (Path(record.stages["model"].artifact) / name).read_bytes()[:4] == b"\x89PNG"

    # Determinism: the same pipeline on a fresh store (nothing cached) trains the same weights.
    again = run(spec.load(pipeline(tmp_path / "store", DIABETES, SMALL))).stages["model"].metrics
    assert again["ranks"][0]["params_sha256"] == metrics["ranks"][0]["params_sha256"]
    assert (again["test/rmse"], again["best_epoch"]) == (
        metrics["test/rmse"],
        metrics["best_epoch"],
    )


def test_categories_missing_values_and_unseen_levels(ray_local, storage):
    from components.bundle import load_model

    frame = shop_frame()
    csv = storage.parent / "shop.csv"
    frame.to_csv(csv, index=False)
    source = regression_source(csv, "y", ["city", "channel"], impute="median")
    # x enters through a periodic embedding (model.PeriodicEmbeddings), export included.
    periodic = {"kind": "periodic", "frequencies": 8, "sigma": 1.0, "dim": 8}
    config = {**SMALL, "epochs": 20, "numeric_embedding": periodic}
    record = run(spec.load(pipeline(storage, source, config)))
    data_dir = Path(record.stages["prepare"].artifact)
    dataset = json.loads((data_dir / "dataset.json").read_text())
    # Every missing value was filled and counted; the fills are the train split's own.
    assert dataset["accounting"]["quarantined"] == 0
    imputed = dataset["accounting"]["imputed_by_column"]
    assert imputed == {
        "x": int((frame["x"] == "").sum()),
        "channel": int((frame["channel"] == "").sum()),
    }
    train = pd.concat(pd.read_parquet(p) for p in sorted((data_dir / "train").glob("*.parquet")))
    raw_train = frame.iloc[train["row_id"].to_numpy()]
    observed = pd.to_numeric(raw_train["x"], errors="coerce").dropna()
    assert dataset["fill"]["x"] == float(np.median(observed))
    counts = raw_train.loc[raw_train["channel"] != "", "channel"].value_counts()
    assert dataset["fill"]["channel"] == min(counts[counts == counts.max()].index)
    assert dataset["levels"] == {"channel": ["shop", "web"], "city": sorted(set(frame["city"]))}

    # The city effect (-3..5) is learned: far below predict-the-mean.
    best = min(p["val/rmse"] for p in history(record.stages["model"].artifact))
    assert best < 0.35 * float(np.std(frame["y"])), best

    model = load_model(record.stages["model"].artifact)
    assert model.module.hparams["numeric_embedding"] == periodic
    rows = [
        {"x": 0.5, "city": "kyiv", "channel": "web"},
        {"x": 0.5, "city": "atlantis", "channel": "web"},  # never seen: the unseen bucket
        {"x": 0.5, "city": "el dorado", "channel": "web"},  # the same bucket
        {"x": None, "city": "kyiv", "channel": "web"},  # missing: the train median
        {"x": dataset["fill"]["x"], "city": "kyiv", "channel": "web"},
        {"x": "0.5", "city": "kyiv", "channel": None},  # text as a CSV holds it; channel mode
        {"x": 0.5, "city": "kyiv", "channel": dataset["fill"]["channel"]},
    ]
    x_num, x_cat = model.spec.encode_rows(rows)
    assert x_cat[1].tolist() == [0, x_cat[0][1]]  # city code 0: the unseen bucket
    for i, j in ((1, 2), (3, 4), (5, 6)):  # each pair: the same inputs, the same prediction
        assert (x_num[i].tolist(), x_cat[i].tolist()) == (x_num[j].tolist(), x_cat[j].tolist())
        # (a float32 sum's last bits depend on the row's place in a batch: one row each)
        assert model.predict(rows[i : i + 1]) == model.predict(rows[j : j + 1])
    p = model.predict(rows)
    assert abs(p[0] - (5.0 + 1.0)) < 1.5  # kyiv + 2 * 0.5, learned from 600 rows
    with pytest.raises(ValueError, match=r"row 0, column 'x': 'abc' is non_numeric"):
        model.predict([{"x": "abc", "city": "kyiv", "channel": "web"}])
    with pytest.raises(ValueError, match=r"lack column\(s\) \['channel'\]"):
        model.predict([{"x": 1.0, "city": "kyiv"}])


@pytest.mark.soak
@pytest.mark.reliability
def test_worker_killed_mid_training_resumes_from_checkpoint(
    ray_local, storage, kill_train_worker_mid_run
):
    # Streamed from the shards, 64 rows at a time: the larger-than-memory path resumes too.
    config = {**SMALL, "epochs": 12, "max_failures": 2, "train_data": "stream", "fetch_rows": 64}
    path = pipeline(storage, DIABETES, config)
    record, _ = kill_train_worker_mid_run(
        lambda: run(spec.load(path)), storage, "model", "val/rmse"
    )
    metrics = record.stages["model"].metrics
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1
    assert metrics["epochs_run"] == 12  # each epoch once: the counter did not restart at zero
    assert [p["step"] for p in history(record.stages["model"].artifact)] == list(range(12))
    assert metrics["test/r2"] > 0.2


def test_periodic_embeddings_fit_a_wave_and_rebuild_from_their_hparams():
    """A non-monotone function of one feature (three periods of a sine over the standardized
    range) is what periodic embeddings are for: a small MLP fits it within a few hundred steps,
    and the module rebuilt from its hparams (as a bundle rebuilds it) gives the same outputs."""
    import torch

    from components.tabular.model import MLP

    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 512).unsqueeze(1)
    y = torch.sin(1.5 * torch.pi * x[:, 0])
    cat = torch.zeros(512, 0, dtype=torch.long)
    periodic = {"kind": "periodic", "frequencies": 8, "sigma": 1.0, "dim": 8}
    model = MLP(1, [], [], [32], 1, dropout=0.0, norm="none", numeric_embedding=periodic)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(x, cat)[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02 * float(y.var()), loss.item()

    again = MLP.from_hparams(model.hparams)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x, cat), model(x, cat))
    assert sum(p.numel() for p in model.numeric_embedding.parameters()) == 8 + 16 * 8 + 8
