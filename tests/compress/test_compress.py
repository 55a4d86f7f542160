"""``model.compress``: one real pipeline (digits, a small CNN, 50% global pruning with a
fine-tuning epoch on Ray Train, a ``max_drop`` gate), then in-process compressions of its
classifier (structured pruning + dynamic int8, static int8) and bad input. Tiny models: the
whole module runs in about two minutes on two cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import run_ok

from components.api import InputArtifact, Resources, StageContext
from components.bundle import load_model, read_bundle
from components.compression import sparsity
from components.data.dataset import load_numpy
from components.model.compress import Compress, CompressConfig, model_input, supported
from components.tune.evaluate import EvaluateConfig, check_thresholds
from components.vision.train import test_scores as scores_of
from pipelines import spec

ROOT = Path(__file__).resolve().parents[2]
FAST = {"warmup": 1, "rounds": 2}
_RUNS: dict = {}


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("compress")


@pytest.fixture
def pipeline_run(ray_local, storage):
    """The one pipeline run of this module (every test that needs it shares it)."""
    if "record" not in _RUNS:
        stages = {
            "prepare": {
                "uses": "data.prepare",
                "with": {"source": {"kind": "sklearn_digits"}, "split": {"val": 0.1, "test": 0.2}},
            },
            "classifier": {
                "uses": "vision.train",
                "needs": ["prepare"],
                "resources": {"workers": 1},
                "with": {"epochs": 3, "batch_size": 64, "lr": 5.0e-3, "width": 8, "depth": 1},
            },
            "pruned": {
                "uses": "model.compress",
                "needs": ["prepare", "classifier"],
                "resources": {"workers": 1},
                "with": {"prune": {"amount": 0.5, "finetune_epochs": 1}, **FAST},
            },
            "gate": {
                "uses": "tune.evaluate",
                "needs": ["prepare", "pruned"],
                "with": {"max_drop": {"test/accuracy": 0.25}},
            },
        }
        path = storage / "p.yaml"
        path.write_text(
            yaml.safe_dump({"name": "c", "storage": str(storage / "s"), "stages": stages})
        )
        _RUNS["record"] = run_ok(spec.load(path))
    return _RUNS["record"]


def artifact(record, stage: str) -> InputArtifact:
    path = Path(record.stages[stage].artifact)
    return InputArtifact(stage, path, json.loads((path / "manifest.json").read_text()))


def context(record, out: Path, stage: str = "c", model: InputArtifact | None = None):
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"prepare": artifact(record, "prepare")}
    inputs["classifier"] = model or artifact(record, "classifier")
    return StageContext(stage, "r", out, str(out.parent / "scratch"), inputs, Resources())


def test_pruned_and_fine_tuned_model_is_scored_again_and_gated(pipeline_run):
    metrics = pipeline_run.stages["pruned"].metrics
    data_dir = Path(pipeline_run.stages["prepare"].artifact)
    model = load_model(pipeline_run.stages["pruned"].artifact)
    original = load_model(pipeline_run.stages["classifier"].artifact)
    # The compressed model's scores are its own, recomputed on the test split: its loss is
    # what the saved model gives, and not the original's.
    again = scores_of(model, data_dir)
    assert metrics["test/loss"] == again["test/loss"] != metrics["original/test/loss"]
    assert metrics["test/accuracy"] == again["test/accuracy"]
    delta = metrics["test/accuracy"] - metrics["original/test/accuracy"]
    assert metrics["compress/metric_delta"] == pytest.approx(delta)
    assert metrics["original/test/accuracy"] == scores_of(original, data_dir)["test/accuracy"]
    # Half the weights pruned, and still zero after the fine-tuning epoch (masks held them).
    assert 0.45 < metrics["compress/sparsity"] < 0.55
    assert 0.45 < sparsity(model.module) < 0.55  # the saved model's, read back
    assert metrics["compress/gzip_ratio"] < 0.9 and 0.95 < metrics["compress/size_ratio"] < 1.05
    assert metrics["test/accuracy"] > 0.5  # it still classifies digits (chance: 0.1)
    assert metrics["compress/latency_ms_b64"] > 0 and metrics["compress/speedup_b1"] > 0
    # The gate compares with the original's accuracy recorded by the stage.
    gate = pipeline_run.stages["gate"].metrics
    assert gate["test/accuracy"] == metrics["test/accuracy"]
    assert "meets the thresholds" in gate["reason"]
    # The run's report shows the original and the compressed model side by side.
    report = Path(pipeline_run.storage) / "runs" / pipeline_run.run_id / "report.html"
    assert "Original vs compressed" in report.read_text()


def test_gate_max_drop_against_the_original(pipeline_run):
    bundle = read_bundle(pipeline_run.stages["pruned"].artifact)
    original = bundle.meta["compression"]["original"]["metrics"]
    metrics = {**original, "test/accuracy": original["test/accuracy"] - 0.01}
    tight = EvaluateConfig(max_drop={"test/accuracy": 0.005})
    assert (
        check_thresholds(metrics, tight, original)
        and "max_drop" in check_thresholds(metrics, tight, original)[0]
    )
    assert (
        check_thresholds(metrics, EvaluateConfig(max_drop={"test/accuracy": 0.02}), original) == []
    )
    with pytest.raises(ValueError, match="not a model.compress"):
        check_thresholds(metrics, tight, None)


def test_structured_dynamic_int8_loads_in_a_fresh_process_and_repeats(pipeline_run, tmp_path):
    config = CompressConfig(
        prune={"amount": 0.5, "structured": True, "scope": "layer"}, quantize="dynamic", **FAST
    )
    outs = []
    for name in ("a", "b"):
        ctx = context(pipeline_run, tmp_path / name)
        metrics = Compress().run(ctx, config)
        outs.append(ctx.out_dir)

    # Channels really removed: fewer weights (half the channels of each layer leave about a
    # third of the weights), a smaller file (at this size torch.save's per-tensor framing is a
    # good part of it).
    def weights(model) -> int:
        return sum(p.numel() for p in model.module.parameters())

    original = load_model(pipeline_run.stages["classifier"].artifact)
    assert weights(load_model(outs[0])) < 0.5 * weights(original)
    assert metrics["compress/size_ratio"] < 0.9
    shapes = read_bundle(outs[0]).meta["compression"]["shapes"]
    assert shapes["body.0.weight"][0] == 4  # 8 channels, half removed
    # Deterministic: the same bytes from the same input and settings.
    assert (outs[0] / "weights.pt").read_bytes() == (outs[1] / "weights.pt").read_bytes()
    x, _ = load_numpy(Path(pipeline_run.stages["prepare"].artifact), "test")
    here = load_model(outs[0]).logits(x[:32]).numpy()
    x_file, y_file = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x_file, x[:32])
    code = (
        "import numpy as np; from components.bundle import load_model; "
        f"m = load_model({str(outs[0])!r}); "
        f"np.save({str(y_file)!r}, m.logits(np.load({str(x_file)!r})).numpy())"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    assert np.array_equal(np.load(y_file), here)
    # raypipe serve takes it as it takes the original (same interface, same loader).
    from components.serve.source import Source

    served = Source(str(outs[0])).load()
    assert served.info["component"] == "vision.train" and served.info["kind"] == "model/classifier"


def test_static_int8_is_calibrated_and_scored(pipeline_run, tmp_path):
    ctx = context(pipeline_run, tmp_path / "s")
    config = CompressConfig(quantize="static", calibration_rows=64, warmup=1, rounds=1)
    metrics = Compress().run(ctx, config)
    model = load_model(ctx.out_dir)
    again = scores_of(model, Path(pipeline_run.stages["prepare"].artifact))
    assert metrics["test/loss"] == pytest.approx(again["test/loss"], abs=1e-6)
    assert metrics["test/loss"] != metrics["original/test/loss"]
    assert metrics["compress/metric_delta"] > -0.05


def test_refusals_name_what_is_supported(pipeline_run, tmp_path):
    with pytest.raises(ValueError, match="it supports: dynamic, weight_only"):
        supported("tabular.mlp", CompressConfig(quantize="static"), "c")
    with pytest.raises(ValueError, match="takes models of tabular.mlp, text.classifier"):
        supported("generative.vae", CompressConfig(quantize="dynamic"), "c")
    with pytest.raises(ValueError, match="structured pruning"):
        supported("text.lm", CompressConfig(prune={"structured": True, "scope": "layer"}), "c")
    for amount in (1.0, -0.1):
        with pytest.raises(ValueError, match="amount"):
            CompressConfig(prune={"amount": amount})
    with pytest.raises(ValueError, match="nothing to do"):
        CompressConfig()
    # A model artifact altered after it was published is refused before anything reads it.
    copy = tmp_path / "classifier"
    shutil.copytree(pipeline_run.stages["classifier"].artifact, copy)
    weights = copy / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = InputArtifact("classifier", copy, json.loads((copy / "manifest.json").read_text()))
    with pytest.raises(ValueError, match="'classifier' fails its checksums.*weights.pt"):
        model_input(context(pipeline_run, tmp_path / "out", model=bad))


def test_a_bad_amount_in_a_pipeline_file_names_the_key(tmp_path):
    path = tmp_path / "p.yaml"
    stages = {"c": {"uses": "model.compress", "with": {"prune": {"amount": 1.0}}}}
    path.write_text(yaml.safe_dump({"name": "x", "stages": stages}))
    with pytest.raises(Exception, match=r"stages\.c\.with\.prune\.amount"):
        spec.load(path)


def test_torch_untouched():
    assert torch.__version__.startswith("2.13")
