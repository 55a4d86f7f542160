"""tune.evaluate: the champion gate on a real MLflow registry (SQLite), alone and in a pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import registry
from components.tune.evaluate import ALIAS, EvaluateConfig, decide, gate
from pipelines import engine, spec

ROOT = Path(__file__).resolve().parents[2]


def client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(uri: str, model: str) -> tuple[str, dict[str, str]]:
    version = client(uri).get_model_version_by_alias(model, ALIAS)
    return str(version.version), dict(version.tags)


def test_decide_thresholds_margin_and_first_champion():
    cfg = EvaluateConfig(
        metric="test/accuracy", min={"test/accuracy": 0.9}, promote_if_better_by=0.01
    )
    assert decide({"test/accuracy": 0.95}, None, cfg)[0]  # no champion: thresholds suffice
    promote, reason, missed = decide({"test/accuracy": 0.85}, None, cfg)
    assert not promote and missed and "< min 0.9" in reason
    assert not decide({"test/accuracy": 0.955}, 0.95, cfg)[0]  # better, but not by 0.01
    assert decide({"test/accuracy": 0.97}, 0.95, cfg)[0]
    loss = EvaluateConfig(metric="test/loss", mode="min", max={"test/loss": 1.0})
    assert decide({"test/loss": 0.2}, 0.3, loss)[0]
    assert not decide({"test/loss": 0.4}, 0.3, loss)[0]
    assert not decide({"test/loss": 1.2}, None, loss)[0]  # over the ceiling


def test_the_gate_metric_and_its_direction_follow_the_candidate():
    plain = EvaluateConfig()
    assert plain.resolved(registry.trainable("vision.train")).metric == "test/accuracy"
    gan = plain.resolved(registry.trainable("generative.gan"))
    assert (gan.metric, gan.mode) == ("test/fd_classifier", "min")
    rl = plain.resolved(registry.trainable("rl.ddpg"))
    assert (rl.metric, rl.mode) == ("test/episode_return_mean", "max")
    assert EvaluateConfig(metric="test/fd_classifier").mode == "min"  # named without a mode
    # A lower distance wins: 12 beats a champion at 15, 18 does not.
    assert decide({"test/fd_classifier": 12.0}, 15.0, gan)[0]
    assert not decide({"test/fd_classifier": 18.0}, 15.0, gan)[0]
    with pytest.raises(ValueError, match="not scored on test/accuracy"):
        EvaluateConfig(min={"test/accuracy": 0.9}).resolved(registry.trainable("rl.ddpg"))


def test_gate_promotes_only_a_better_candidate_and_moves_the_alias(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = EvaluateConfig(metric="test/accuracy", min={"test/accuracy": 0.5}, register_as="digits")
    src = str(tmp_path)

    low = gate(uri, "digits", src, {"test/accuracy": 0.4}, cfg)
    assert not low.promoted and "below thresholds" in low.reason
    first = gate(uri, "digits", src, {"test/accuracy": 0.8}, cfg)
    assert first.promoted and first.champion is None and "no champion yet" in first.reason
    assert champion(uri, "digits")[0] == first.version
    worse = gate(uri, "digits", src, {"test/accuracy": 0.7}, cfg)
    assert not worse.promoted and worse.champion == pytest.approx(0.8)
    assert champion(uri, "digits")[0] == first.version  # the alias stayed
    better = gate(uri, "digits", src, {"test/accuracy": 0.9}, cfg)
    assert better.promoted and better.champion_version == first.version
    version, tags = champion(uri, "digits")
    assert version == better.version  # the alias moved
    assert float(tags["metric.test/accuracy"]) == pytest.approx(0.9)
    assert tags["gate.promoted"] == "true"
    # Every candidate is a version, promoted or not, with its decision.
    versions = client(uri).search_model_versions("name='digits'")
    assert sorted(v.tags["gate.promoted"] for v in versions) == ["false", "false", "true", "true"]


def test_a_gate_run_again_after_its_driver_died_registers_nothing_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = EvaluateConfig(metric="test/accuracy", register_as="digits")
    src = str(tmp_path)
    old = gate(uri, "digits", src, {"test/accuracy": 0.8}, cfg)
    ident = {"raypipe.run_id": "run-1", "raypipe.gate": "gate", "raypipe.digest": "abc"}

    # Promoted, then the driver died before the stage was published: the resumed gate finds
    # its version, which is the champion, and the decision stands (not "no gain over itself").
    first = gate(uri, "digits", src, {"test/accuracy": 0.9}, cfg, tags=ident)
    again = gate(uri, "digits", src, {"test/accuracy": 0.9}, cfg, tags=ident)
    assert first.promoted and again.promoted and again.version == first.version
    assert again.champion_version == old.version and again.champion == pytest.approx(0.8)
    assert len(client(uri).search_model_versions("name='digits'")) == 2

    # Registered, then the driver died before the alias moved: the resumed gate moves it.
    other = {**ident, "raypipe.run_id": "run-2"}
    mlflow_client = client(uri)
    orphan = mlflow_client.create_model_version(
        "digits", source=src, tags={**other, "metric.test/accuracy": "0.95"}
    )
    resumed = gate(uri, "digits", src, {"test/accuracy": 0.95}, cfg, tags=other)
    assert resumed.promoted and resumed.version == str(orphan.version)
    assert champion(uri, "digits")[0] == resumed.version
    assert len(client(uri).search_model_versions("name='digits'")) == 3


def test_concurrent_gates_leave_the_alias_on_the_best_model(tmp_path):
    """Six processes gate at the same moment; the alias must end on the best candidate and
    every promotion must have beaten the champion it saw (no lost update)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scores = [0.81, 0.95, 0.86, 0.91, 0.83, 0.89]
    start = time.time() + 8  # all processes import mlflow first, then go together
    code = (
        "import json, sys, time\n"
        "from components.tune.evaluate import EvaluateConfig, gate\n"
        "uri, score, start = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])\n"
        "cfg = EvaluateConfig(metric='test/accuracy', mode='max', register_as='race')\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "d = gate(uri, 'race', sys.argv[4], {'test/accuracy': score}, cfg)\n"
        "print(json.dumps(d.__dict__))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri, str(s), str(start), str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in scores
    ]
    decisions = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        decisions.append(json.loads(out.strip().splitlines()[-1]))
    version, tags = champion(uri, "race")
    assert float(tags["metric.test/accuracy"]) == pytest.approx(max(scores))
    by_version = sorted(decisions, key=lambda d: int(d["version"]))
    assert [d["version"] for d in by_version] == [str(i) for i in range(1, 7)]
    best_so_far = None
    for d in by_version:  # replaying in registration order gives exactly the same decisions
        assert d["champion"] == best_so_far
        assert d["promoted"] == (best_so_far is None or d["candidate"] > best_so_far)
        if d["promoted"]:
            best_so_far = d["candidate"]


PIPELINE = """\
name: gate-test
storage: {storage}
stages:
  prepare:
    uses: data.prepare
    with:
      split: {{val: 0.1, test: 0.2, seed: 0}}
  weak:
    uses: vision.train
    needs: [prepare]
    resources: {{workers: 1, cpus_per_worker: 1}}
    with: {{epochs: 1, width: 4, lr: 1.0e-4, batch_size: 64}}
  strong:
    uses: vision.train
    needs: [prepare]
    resources: {{workers: 1, cpus_per_worker: 1}}
    with: {{epochs: 5, width: 8, lr: 3.0e-3, batch_size: 64}}
  gate_weak:
    uses: tune.evaluate
    needs: [prepare, weak]
    with: {{register_as: digits-cnn, min: {{test/accuracy: 0.01}}}}
  gate_strong:
    uses: tune.evaluate
    needs: [prepare, strong, gate_weak]
    with: {{register_as: digits-cnn, min: {{test/accuracy: 0.01}}}}
  gate_weak_again:
    uses: tune.evaluate
    needs: [prepare, weak, gate_strong]
    with: {{register_as: digits-cnn, promote_if_better_by: 0.0}}
  gate_strict:
    uses: tune.evaluate
    needs: [prepare, strong, gate_weak_again]
    with: {{register_as: digits-strict, min: {{test/accuracy: 0.9999}}}}
"""


def test_gates_in_a_pipeline_promote_the_better_classifier(ray_local, tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(PIPELINE.format(storage=tmp_path / "store"))
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.ok, record.error
    m = {name: record.stages[name].metrics for name in record.stages}
    weak, strong = m["weak"]["test/accuracy"], m["strong"]["test/accuracy"]
    assert strong > weak + 0.1, (weak, strong)  # the candidates really differ
    # The gate re-scores the exported model on the test split: same number as training said.
    assert m["gate_strong"]["test/accuracy"] == pytest.approx(strong, abs=1e-6)
    assert m["gate_weak"]["promoted"] and m["gate_weak"]["champion/test/accuracy"] is None
    assert m["gate_strong"]["promoted"]
    assert m["gate_strong"]["champion/test/accuracy"] == pytest.approx(weak, abs=1e-6)
    assert not m["gate_weak_again"]["promoted"]
    assert "vs champion" in m["gate_weak_again"]["reason"]
    assert not m["gate_strict"]["promoted"] and "below thresholds" in m["gate_strict"]["reason"]
    # The registry, read back through the MLflow client.
    uri = record.tracking
    version, tags = champion(uri, "digits-cnn")
    assert version == m["gate_strong"]["model_version"]
    assert float(tags["metric.test/accuracy"]) == pytest.approx(strong, abs=1e-6)
    assert tags["raypipe.stage"] == "strong"
    import mlflow

    with pytest.raises(mlflow.exceptions.MlflowException):  # never promoted: no champion
        client(uri).get_model_version_by_alias("digits-strict", ALIAS)
    decision = json.loads(
        (Path(record.stages["gate_weak_again"].artifact) / "decision.json").read_text()
    )
    assert decision["promoted"] is False and decision["champion_version"] == version
