"""MLflow tracking of every stage, read back through the MLflow client."""

from __future__ import annotations

from mlflow import MlflowClient

from pipelines import engine, spec


def test_stages_are_tracked_as_nested_mlflow_runs(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: tracked\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  a: {uses: test.sleep, with: {value: 1.5, steps: 3}}\n"
        "  b: {uses: test.sleep, needs: [a], resources: {workers: 2}}\n"
        "  bad: {uses: test.fail, with: {message: tracked failure}}\n"
    )
    first = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    second = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert first.tracking == f"sqlite:///{tmp_path / 'store'}/mlflow.db"
    assert first.mlflow_run_id and first.tracking_error is None

    client = MlflowClient(tracking_uri=first.tracking)
    experiment = client.get_experiment_by_name("tracked")
    parent = client.get_run(first.mlflow_run_id)
    assert parent.data.tags["raypipe.run_id"] == first.run_id
    assert parent.info.status == "FAILED"  # the run failed (stage bad)
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first.mlflow_run_id}'",
    )
    by_stage = {r.data.tags["raypipe.stage"]: r for r in children}
    assert set(by_stage) == {"a", "b", "bad"}
    a = by_stage["a"]
    assert a.data.params["value"] == "1.5" and a.data.params["steps"] == "3"
    assert a.data.params["resources.workers"] == "1"
    assert a.data.metrics["value"] == 1.5
    history = client.get_metric_history(a.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert by_stage["b"].data.params["resources.workers"] == "2"
    assert by_stage["bad"].info.status == "FAILED"
    assert "tracked failure" in by_stage["bad"].data.tags["raypipe.error"]
    assert "manifest.json" in {f.path for f in client.list_artifacts(a.info.run_id)}

    # The second run is tracked too, its stages marked as cache hits.
    cached = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{second.mlflow_run_id}'",
    )
    assert {r.data.tags["raypipe.stage"]: r.data.tags["raypipe.cache_hit"] for r in cached} == {
        "a": "true",
        "b": "true",
        "bad": "false",
    }
