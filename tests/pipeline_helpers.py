"""Running a pipeline in a test: quietly, failing with every failed stage's error and traceback."""

from __future__ import annotations

from pipelines import engine


def run_ok(pipeline, **kwargs):
    """Runs ``pipeline`` (a loaded ``spec.Pipeline``) and returns its record; fails the test,
    with each failed stage's traceback, unless every stage succeeded."""
    record = engine.run_pipeline(pipeline, printer=lambda _line: None, **kwargs)
    failed = {name: s.traceback or s.error for name, s in record.stages.items() if s.error}
    assert record.ok, f"{record.error}\n{failed}"
    return record
