"""vision.train on real Ray Train: learning, multi-node DDP, worker failure, export, GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import run_ok as run

from pipelines import engine, spec

PREPARE = """\
  prepare:
    uses: data.prepare
    with:
      augment: {copies: 1, rotate: 8, shift: 0.08, seed: 0}
      split: {val: 0.1, test: 0.2, seed: 0}
"""


def vision_pipeline(storage: Path, train_with: str, resources: str = "{workers: 1}"):
    path = storage.parent / f"p-{abs(hash(train_with + resources))}.yaml"
    path.write_text(
        f"name: vision-test\nstorage: {storage}\nstages:\n{PREPARE}"
        f"  classifier:\n    uses: vision.train\n    needs: [prepare]\n"
        f"    resources: {resources}\n    with: {train_with}\n"
    )
    return spec.load(path)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One storage for the module: the prepared digits are computed once and then cached."""
    return tmp_path_factory.mktemp("vision") / "store"


def test_learns_digits_and_the_export_reproduces_test_accuracy(ray_local, storage):
    from components.bundle import load_model
    from components.data.dataset import load_dataset_info, load_numpy

    record = run(vision_pipeline(storage, "{epochs: 8, batch_size: 64, lr: 3.0e-3, width: 16}"))
    metrics = record.stages["classifier"].metrics
    assert metrics["test/accuracy"] > 0.95, metrics
    art = Path(record.stages["classifier"].artifact)
    history = [json.loads(line) for line in (art / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(8))
    assert history[-1]["train/loss"] < 0.5 * history[0]["train/loss"]  # learning happened
    assert {"train/loss", "val/loss", "val/accuracy"} <= set(history[0])
    confusion = json.loads((art / "confusion_matrix.json").read_text())["matrix"]
    assert np.asarray(confusion).sum() == metrics["test/rows"]
    assert (art / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # Reload the exported model alone and score it on the test shards.
    model = load_model(art)
    data_dir = Path(record.stages["prepare"].artifact)
    x, y = load_numpy(data_dir, "test")
    assert len(y) == metrics["test/rows"] == load_dataset_info(data_dir).splits["test"]["rows"]
    accuracy = float((model.predict(x).numpy() == y).mean())
    assert accuracy == pytest.approx(metrics["test/accuracy"], abs=1e-9)
    assert model.bundle.meta["normalization"]["method"] == "standard"
    assert model.bundle.config["epochs"] == 8


@pytest.mark.reliability
def test_rejects_a_tabular_dataset(ray_local, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)))
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: t\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  prepare:\n    uses: data.prepare\n"
        f"    with: {{source: {{kind: csv, paths: [{csv}], label_column: label}}}}\n"
        "  classifier: {uses: vision.train, needs: [prepare], with: {epochs: 1}}\n"
    )
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.stages["prepare"].status == "succeeded"
    assert "needs an image dataset" in record.stages["classifier"].error


def test_rejects_a_single_class_dataset(ray_local, tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "seven"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: t\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  prepare:\n    uses: data.prepare\n"
        f"    with: {{source: {{kind: image_folder, root: {folder.parent}, size: [8, 8], "
        "channels: 1}, split: {val: 0.2, test: 0.2}}\n"
        "  classifier: {uses: vision.train, needs: [prepare], with: {epochs: 1}}\n"
    )
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.stages["prepare"].status == "succeeded"
    error = record.stages["classifier"].error
    assert "needs at least 2 classes" in error and "'prepare'" in error and "seven" in error


def test_a_held_shard_is_in_row_order_and_its_batches_follow_the_seed(ray_local):
    """``train_data: memory`` reads a worker's shard once: Ray Data hands blocks over as they
    are ready, so the rows are put back in (row_id, copy) order; a seed fixes the shuffle."""
    import ray
    import torch

    from components import training

    rng = np.random.default_rng(0)
    rows = [{"row_id": int(r), "copy": int(c), "x": float(r * 10 + c)}
            for r in rng.permutation(50) for c in (1, 0)]  # fmt: skip
    shard = ray.data.from_items(rows, override_num_blocks=7).iterator()
    held = training.read_shard_of(shard)
    assert held["row_id"].tolist() == [r for r in range(50) for _ in (0, 1)]
    assert held["copy"].tolist() == [0, 1] * 50
    assert held["x"].tolist() == [r * 10.0 + c for r in range(50) for c in (0, 1)]

    x = torch.arange(10)
    assert [b.tolist() for (b,) in training.batches((x,), 4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    once, again = ([b.tolist() for (b,) in training.batches((x,), 4, seed=3)] for _ in (0, 1))
    assert once == again and sorted(sum(once, [])) == list(range(10))
    assert once != [b.tolist() for (b,) in training.batches((x,), 4, seed=4)]


@pytest.mark.slow
def test_two_workers_on_two_nodes_end_with_identical_parameters(ray_cluster, tmp_path):
    """Streamed shards (``train_data: stream``, the path of data larger than memory)."""
    record = run(
        vision_pipeline(
            tmp_path / "store",
            "{epochs: 2, batch_size: 64, width: 8, train_data: stream}",
            "{workers: 2, cpus_per_worker: 1}",
        )
    )
    ranks = record.stages["classifier"].metrics["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["node"] for r in ranks}) == 2, "both workers ran on one node"
    assert len({r["params_sha256"] for r in ranks}) == 1, "ranks disagree after training"
    assert record.stages["classifier"].metrics["test/accuracy"] > 0.5


@pytest.mark.reliability
@pytest.mark.slow
def test_worker_killed_mid_training_resumes_from_checkpoint(
    ray_local, storage, kill_train_worker_mid_run
):
    pipeline = vision_pipeline(
        storage, "{epochs: 8, batch_size: 32, width: 8, max_failures: 2, shuffle_buffer: 0}"
    )
    record, _ = kill_train_worker_mid_run(
        lambda: run(pipeline), storage, "classifier", "train/loss"
    )
    metrics = record.stages["classifier"].metrics
    assert metrics["resumed_from_epoch"] is not None, metrics
    assert metrics["resumed_from_epoch"] >= 1
    assert metrics["epochs_run"] == 8  # each epoch once: the counter did not restart at zero
    art = Path(record.stages["classifier"].artifact)
    steps = [json.loads(line)["step"] for line in (art / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none here)"
)
def test_gpu_bf16_steps(ray_local, tmp_path):
    record = run(
        vision_pipeline(
            tmp_path / "store",
            "{epochs: 1, batch_size: 256, precision: bf16}",
            "{workers: 1, gpu: true}",
        )
    )
    metrics = record.stages["classifier"].metrics
    assert metrics["use_gpu"] is True
    assert np.isfinite(metrics["test/loss"])
