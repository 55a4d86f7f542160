"""Hostile files: model files and checkpoints are loaded without running code; pipeline files
and run records are parsed without constructing objects; nothing escapes the storage root;
planted secrets never reach logs, run records, reports or MLflow."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from reliability_helpers import cli, cli_env
from typer.testing import CliRunner

from pipelines import engine
from pipelines.cli import app
from pipelines.store import ArtifactInvalid, Store

pytestmark = pytest.mark.reliability


class Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> Path:
    """Writes a torch file whose unpickling runs a command (it creates ``marker``)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "hparams": {}, "kind": "vae"}, path)
    return path


def test_planted_pickles_in_models_and_checkpoints_are_refused(tmp_path):
    import pickle

    import torch

    from components.bundle import BUNDLE_FILE, Bundle, load_model
    from components.training import load_state

    marker = tmp_path / "pwned"
    # The control: loaded the unsafe way, the file really runs its command.
    torch.load(plant(tmp_path / "control.pt", marker), weights_only=False)
    assert marker.exists(), "the planted file is not hostile; the test proves nothing"
    marker.unlink()

    def bundle_of(loader: str) -> dict:
        """A well-formed bundle.json naming a family's loader, beside the planted weights."""
        return Bundle("x", "model/x", loader, {}, {}, {}, {}).describe()

    loaders = {
        "classifier weights.pt": (load_model, "weights.pt", "components.vision.model:load"),
        "generator weights.pt": (
            load_model,
            "weights.pt",
            "components.generative.sampling:load_gan",
        ),
        "policy weights.pt": (load_model, "weights.pt", "components.rl.policy:load"),
        "Train checkpoint state.pt": (load_state, "state.pt", None),
    }
    for what, (load, name, loader) in loaders.items():
        folder = tmp_path / what.split()[0]
        plant(folder / name, marker)
        if loader:
            (folder / BUNDLE_FILE).write_text(json.dumps(bundle_of(loader)))
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(folder)
        assert not marker.exists(), f"loading a planted {what} ran its code"


def test_yaml_tags_are_refused_in_pipeline_files_and_saved_runs(tmp_path):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\nstages:\n  a: {{uses: test.sleep, with: {{value: {tag}}}}}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "invalid YAML" in result.output, result.output
    # A run whose saved pipeline was replaced: `resume` parses it the same safe way.
    store = Store(str(tmp_path / "store"))
    record = engine.RunRecord("r1", "x", str(path), store.root, None, [], [])
    store.write_run_file("r1", engine.RUN_FILE, record.to_json())
    store.write_run_file("r1", engine.PIPELINE_FILE, path.read_text())
    result = CliRunner().invoke(app, ["resume", "r1", "--storage", store.root])
    assert result.exit_code == 2 and "invalid YAML" in result.output, result.output
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["../outside", "/etc", "a/../../b", "..", "runs/../../x"])
def test_paths_cannot_leave_the_storage_root(tmp_path, bad):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="would leave the storage root"):
        store.join("runs", bad)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "run.json").write_text("{}")
    # A run id is a path part: every command that takes one refuses one that leaves the root.
    for args in (["show", bad], ["resume", bad], ["report", bad]):
        result = CliRunner().invoke(app, [*args, "--storage", store.root])
        assert result.exit_code == 2, (args, result.output)
        assert "no run" in result.output, (args, result.output)


def test_a_manifest_cannot_point_outside_its_artifact(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    out = store.new_output_dir("k1")
    (out / "ok.txt").write_text("fine")
    manifest = store.publish(out, "test.sleep", "k1", {"component": "test.sleep"})
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    # A tampered manifest that lists a file outside the artifact, with its true checksum.
    art = Path(manifest["path"])
    listed = json.loads((art / "manifest.json").read_text())
    listed["files"]["../../../../secret.txt"] = {
        "bytes": secret.stat().st_size,
        "sha256": __import__("hashlib").sha256(secret.read_bytes()).hexdigest(),
    }
    (art / "manifest.json").write_text(json.dumps(listed))
    with pytest.raises(ArtifactInvalid, match="leaves the artifact"):
        store.verify("test.sleep", "k1")
    # From an object store the files are downloaded first: the name must not lead the copy
    # out of the local cache either.
    remote = Store(f"file://{tmp_path}/remote")
    out = remote.new_output_dir("k3")
    (out / "ok.txt").write_text("fine")
    manifest = remote.publish(out, "test.sleep", "k3", {"component": "test.sleep"})
    art = tmp_path / "remote" / "artifacts" / "test.sleep" / "k3"
    (tmp_path / "remote" / "evil.txt").write_text("planted")
    listed = json.loads((art / "manifest.json").read_text())
    listed["files"]["../../../../../../../../../../../../tmp/escaped"] = listed["files"]["ok.txt"]
    listed["files"]["../../evil.txt"] = listed["files"]["ok.txt"]
    (art / "manifest.json").write_text(json.dumps(listed))
    jail = tmp_path / "jail"
    monkeypatch.setenv("RAYPIPE_CACHE", str(jail / "a" / "b" / "c" / "cache"))
    with pytest.raises(ArtifactInvalid, match="leaves the artifact"):
        remote.verify("test.sleep", "k3")
    written = [p for p in jail.rglob("*") if p.is_file()]
    assert [p.name for p in written] == ["ok.txt"], written
    assert not Path("/tmp/escaped").exists()
    # Nor can a stage publish a link to a file outside its output.
    out = store.new_output_dir("k2")
    (out / "link").symlink_to(secret)
    with pytest.raises(ValueError, match="symbolic link"):
        store.publish(out, "test.sleep", "k2", {"component": "test.sleep"})


def test_planted_secrets_never_reach_logs_records_reports_or_mlflow(tmp_path):
    token, aws, password = (f"planted-{name}-{os.urandom(8).hex()}" for name in "abc")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))  # short: Ray's socket paths
    store = tmp_path / "store"
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: secrets\nstorage: {store}\nstages:\n"
        "  a: {uses: test.sleep, with: {steps: 2}}\n"
        "  b: {uses: test.sleep, needs: [a]}\n"
        "  c: {uses: test.fail, needs: [b]}\n"  # a failure: its error and traceback are saved
    )
    env = cli_env(
        RAY_AUTH_TOKEN=token,  # auth is disabled (cli_env): present, never needed
        AWS_SECRET_ACCESS_KEY=aws,
        MLFLOW_TRACKING_PASSWORD=password,
        RAY_TMPDIR=str(ray_tmp),
    )
    try:
        result = cli("run", str(path), "--verbose", env=env)
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert "stage 'c' failed" in result.stderr
        run_id = result.stdout.split()[1]
        report = cli("report", run_id, "--storage", str(store), env=env)
        shown = cli("show", run_id, "--storage", str(store), "--json", env=env)
        outputs = [result.stdout, result.stderr, report.stdout, report.stderr, shown.stdout]
        files = [p for root in (store, ray_tmp) for p in root.rglob("*") if p.is_file()]
        assert (store / "runs" / run_id / "report.html").exists()
        assert (store / "mlflow.db").exists()
        assert any(p.name.endswith(".log") or p.name.endswith(".out") for p in files)
        for secret in (token, aws, password):
            assert not [o for o in outputs if secret in o], "a secret was printed"
            leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
            assert not leaked, f"a secret was written to {leaked}"
        with sqlite3.connect(store / "mlflow.db") as db:
            params = db.execute("select key, value from params").fetchall()
        assert params and not [p for p in params if any(s in p[1] for s in (token, aws, password))]
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
