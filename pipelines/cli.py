"""The ``raypipe`` command.

Exit codes: 0 success; 1 a stage (or job) failed; 2 invalid input (pipeline file, override,
unknown run id), always reported before Ray starts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines import spec as spec_mod

app = typer.Typer(
    help="Run machine-learning pipelines, written as YAML, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_STORAGE = os.environ.get("RAYPIPE_STORAGE", "./runs")
StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage", "-s", help="Storage root of the runs (path or URI).", envvar="RAYPIPE_STORAGE"
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to run on (ray://HOST:10001 or HOST:6379); default: embedded local Ray.",
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only the run id, the outcome and errors.")
]


def _console(quiet: bool):
    """Sets up output for a run: plain lines without control codes when stdout is not a
    terminal (CI logs), and the engine's progress printer (silent with ``--quiet``)."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's log prefixes uncolored
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # no redrawn bars
    if quiet:
        return lambda line: None
    return lambda line: typer.echo(line)


def _load(file: Path, overrides: list[str] | None) -> spec_mod.Pipeline:
    try:
        return spec_mod.load(file, overrides or [])
    except spec_mod.PipelineError as e:
        raise _fail(str(e)) from None


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="stage.key=value overrides.")
    ] = None,
) -> None:
    """Checks a pipeline file (and overrides) without running anything."""
    pipeline = _load(file, overrides)
    typer.echo(f"{file}: ok, pipeline {pipeline.name!r} with {len(pipeline.stages)} stages")
    for name in pipeline.order:
        stage = pipeline.stages[name]
        needs = f" <- {', '.join(stage.needs)}" if stage.needs else ""
        typer.echo(f"  {name}: {stage.uses}{needs}")


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="stage.key=value overrides.")
    ] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force", "-f", help="Recompute this stage and its descendants (repeatable)."
        ),
    ] = None,
    address: AddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Runs a pipeline; prints the run id; exits non-zero if a stage failed."""
    pipeline = _load(file, overrides)
    from pipelines import engine

    printer = _console(quiet)
    try:
        runner = engine.Runner(pipeline, force=force or [], address=address, printer=printer)
    except spec_mod.PipelineError as e:
        raise _fail(str(e)) from None
    record = runner.run()
    _finish(record)


def _finish(record) -> None:
    typer.echo(f"run {record.run_id}: {record.status}")
    if not record.ok:
        raise _fail(record.error or "the run failed", code=1)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The run to finish.")],
    storage: StorageOpt = DEFAULT_STORAGE,
    address: AddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Finishes a run that died, from its last complete stage."""
    from pipelines import engine

    try:
        record = engine.resume_run(storage, run_id, address=address, printer=_console(quiet))
    except (FileNotFoundError, spec_mod.PipelineError) as e:
        raise _fail(str(e)) from None
    _finish(record)


@app.command()
def runs(storage: StorageOpt = DEFAULT_STORAGE) -> None:
    """Lists the runs in a storage root, newest last."""
    from pipelines import engine
    from pipelines.store import Store

    records = engine.list_records(Store(storage))
    if not records:
        typer.echo(f"no runs in {Store(storage).root}")
        return
    for r in records:
        done = sum(st["status"] == "succeeded" for st in r.stages.values())
        typer.echo(f"{r.run_id}  {r.pipeline:<24} {r.status:<10} {done}/{len(r.stages)} stages")


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id (see `raypipe runs`).")],
    storage: StorageOpt = DEFAULT_STORAGE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
) -> None:
    """Shows one run: its stages, states, cache hits, times, metrics and errors."""
    from pipelines import engine
    from pipelines.store import Store

    try:
        record = engine.load_record(Store(storage), run_id)
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(json.loads(record.to_json()), indent=1, sort_keys=True))
        return
    typer.echo(f"run {record.run_id}  pipeline {record.pipeline}  status {record.status}")
    for name, st in record.stages.items():
        cached = "cached" if st.get("cache_hit") else ""
        secs = st.get("seconds")
        took = f"{secs:.1f}s" if isinstance(secs, int | float) else ""
        typer.echo(f"  {name:<16} {st['status']:<10} {cached:<7} {took:>8}  {st.get('uses')}")
        metrics = {k: v for k, v in (st.get("metrics") or {}).items() if isinstance(v, int | float)}
        if metrics:
            typer.echo("      " + json.dumps(metrics)[:300])
        if st.get("error"):
            typer.echo(f"      error: {st['error']}")
    if record.error:
        typer.echo(f"error: {record.error}")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="A run id (see `raypipe runs`).")],
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """(Re)writes a run's self-contained HTML report and prints its path."""
    from pipelines.report import write_report
    from pipelines.store import Store

    try:
        typer.echo(write_report(Store(storage), run_id))
    except FileNotFoundError as e:
        raise _fail(str(e)) from None


@app.command()
def components() -> None:
    """Lists the components a pipeline can use."""
    from components import registry

    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:<18} v{cls.version:<4} {doc}")


def main() -> None:  # pragma: no cover - the console script calls `app`
    app(prog_name="raypipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
