"""The ``raypipe`` command.

Exit codes: 0 success; 1 a stage (or job) failed; 2 invalid input (pipeline file, override,
run id, run record, storage), always reported before Ray starts; 3 raypipe itself failed (a
bug). Every error is one line on stderr: no traceback reaches the console. Where one was
raised that is not raypipe's own account of bad input, the line names the log file that holds
it (under ``$RAYPIPE_LOG_DIR``, by default ``<temp dir>/raypipe-logs``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from pipelines import record as record_mod
from pipelines import spec as spec_mod
from pipelines.guards import InputError, block, one_line, redact
from pipelines.record import Status

#: The full traceback of an error the CLI reports in one line is kept this long.
MAX_LOG_CHARS = 1 << 20


class GuardedGroup(TyperGroup):
    """The ``raypipe`` group: runs a command and turns what escapes it into one line.

    Bad input (:class:`~pipelines.guards.InputError`: a pipeline file, an override, a run
    record, a storage location) is its own message, exit 2. An ``OSError`` (a disk, a
    permission, a network) is one line naming the log file with its traceback, exit 2.
    Anything else is a bug in raypipe: one line naming the log, exit 3. A usage error (an
    unknown option, a missing argument) is one line too, exit 2.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        given = args[0] if args else kwargs.get("args")
        #: The command's own arguments, for the log of an error (not sys.argv: the command may
        #: be run inside another program, a test's CliRunner).
        self.argv = [str(a) for a in (sys.argv[1:] if given is None else given)]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # a usage error
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":  # `raypipe` alone: its help
                typer.echo(e.format_message(), err=True)
            else:
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                typer.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors, exits
            raise
        except InputError as e:
            raise _fail(str(e)) from None
        except Exception as e:  # noqa: BLE001 - the one place that sees every failure
            raise _unexpected(e, getattr(self, "argv", sys.argv[1:])) from None


def _unexpected(error: Exception, argv: list[str]) -> typer.Exit:
    """Writes ``error``'s traceback to a log file; returns the exit that names it."""
    where = _write_log(error, argv)
    shown = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError):
        return _fail(f"{shown} ({where})")
    return _fail(f"internal error (a bug in raypipe): {shown} ({where})", code=3)


def _write_log(error: Exception, argv: list[str]) -> str:
    """Writes the command line (``raypipe ARGV``) and ``error``'s traceback, redacted, to a
    new log file; returns where it is, in words."""
    folder = Path(os.environ.get("RAYPIPE_LOG_DIR") or Path(tempfile.gettempdir()) / "raypipe-logs")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = folder / f"error-{stamp}-{os.getpid()}-{secrets.token_hex(3)}.log"
    text = "".join(traceback.format_exception(error))
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "x") as f:
            f.write(f"raypipe {redact(' '.join(argv))}\n")
            f.write(block(text, MAX_LOG_CHARS))
    except OSError as e:
        return f"its traceback could not be written to {path}: {e.strerror}"
    return f"traceback in {path}"


app = typer.Typer(
    cls=GuardedGroup,
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
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Ray cluster to run on: HOST:6379, ray://HOST:10001, or auto (the cluster this "
        "machine is part of); default: an embedded local Ray. (The Jobs API, "
        "http://HEAD:8265, is `raypipe submit --address`.)",
    ),
]
# `run --address` meant the Ray address before `--ray-address`; kept working, off the help.
OldAddressOpt = Annotated[str | None, typer.Option("--address", hidden=True)]


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Prints ``error: MESSAGE`` (one line, bounded, redacted); returns the exit to raise."""
    typer.echo(f"error: {one_line(message)}", err=True)
    return typer.Exit(code)


def _ray_address(ray_address: str | None, old_address: str | None) -> str | None:
    """The Ray address of `run`/`resume`, from --ray-address or the deprecated --address."""
    if old_address is not None:
        typer.echo(
            "note: `--address` of run/resume is deprecated; use --ray-address "
            "(`--address` now always means the Jobs API of submit, jobs and schedule)",
            err=True,
        )
        if ray_address is not None and ray_address != old_address:
            raise _fail(f"--ray-address {ray_address} and --address {old_address} disagree")
        ray_address = old_address
    if ray_address and ray_address.startswith(("http://", "https://")):
        raise _fail(
            f"{ray_address} is a Jobs API (dashboard) address: `raypipe submit FILE --address "
            f"{ray_address}` sends a pipeline there; --ray-address takes HOST:6379, "
            "ray://HOST:10001 or auto"
        )
    return ray_address


QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only the run id, the outcome and errors.")
]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Also show Ray's own output (workers, Data, Train)."),
]


def _console(stages: list[str], quiet: bool, verbose: bool) -> tuple[dict, Any]:
    """How a run talks: in a terminal, a live table of stages; elsewhere (CI logs, a file) one
    plain line per stage event with no control codes. Either way Ray's own output (workers,
    Data, Train) stays in Ray's log files, whose path is printed once, unless ``--verbose``;
    stage errors still come back with their tracebacks.

    Returns:
        The Runner's output options, and a context manager to run inside.
    """
    import contextlib

    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's log prefixes uncolored
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # no redrawn bars
        if quiet:
            return {"printer": lambda line: None, "ray_logs": verbose}, contextlib.nullcontext()
        return {"printer": typer.echo, "ray_logs": verbose}, contextlib.nullcontext()
    if quiet:
        return {"printer": lambda line: None, "ray_logs": verbose}, contextlib.nullcontext()
    from pipelines.progress import LiveTable

    live = LiveTable(stages)
    return {"printer": live.line, "display": live.stage, "ray_logs": verbose}, live


def _load(file: Path, overrides: list[str] | None) -> spec_mod.Pipeline:
    return spec_mod.load(file, overrides or [])  # a PipelineError is one line (GuardedGroup)


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
    ray_address: RayAddressOpt = None,
    address: OldAddressOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Runs a pipeline; prints the run id; exits non-zero if a stage failed."""
    pipeline = _load(file, overrides)
    ray_address = _ray_address(ray_address, address)
    from pipelines import engine

    output, context = _console(pipeline.order, quiet, verbose)
    runner = engine.Runner(
        pipeline, force=force or [], address=ray_address, track_later=True, **output
    )
    with context:
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
    ray_address: RayAddressOpt = None,
    address: OldAddressOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Finishes a run that died, from its last complete stage."""
    ray_address = _ray_address(ray_address, address)
    from pipelines import engine
    from pipelines.store import Store

    stages = list(record_mod.load_record(Store(storage), run_id).stages)
    output, context = _console(stages, quiet, verbose)
    try:
        with context:
            record = engine.resume_run(storage, run_id, address=ray_address, **output)
    except engine.RunLocked as e:
        raise _fail(str(e)) from None
    _finish(record)


@app.command()
def runs(
    storage: StorageOpt = DEFAULT_STORAGE,
    pipeline: Annotated[
        str | None,
        typer.Option("--pipeline", "-p", help="Only this pipeline, with key metrics compared."),
    ] = None,
) -> None:
    """Lists the runs in a storage root, newest last; `--pipeline` compares their metrics."""
    from pipelines.store import Store

    store = Store(storage)
    records, damaged = record_mod.read_records(store)
    if pipeline is not None:
        records = [r for r in records if r.pipeline == pipeline]
    if not records and not (damaged and pipeline is None):
        of = f" of {one_line(pipeline, 100)}" if pipeline else ""
        typer.echo(f"no runs{of} in {store.shown_root}")
    if pipeline is None:
        rows = {r.run_id: _run_row(r) for r in records}
        for run_id, why in damaged.items():
            rows[run_id] = f"{one_line(run_id, 100)}  damaged: {why}"
        for run_id in sorted(rows):
            typer.echo(rows[run_id])
        return
    if damaged:
        typer.echo(f"({len(damaged)} damaged run records left out: `raypipe runs` lists them)")
    if not records:
        return
    # Side by side: one row per run, one column per numeric stage metric any run has.
    columns: list[tuple[str, str]] = []
    for r in records:
        for stage, st in r.stages.items():
            for key, value in st.metrics.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if numeric and _is_key_metric(key) and (stage, key) not in columns:
                    columns.append((stage, key))
    header = ["run", "status", *[one_line(f"{stage}:{key}", 80) for stage, key in columns]]
    rows = [header]
    for r in records:
        cells = [r.run_id, r.status]
        for stage, key in columns:
            entry = r.stages.get(stage)
            value = entry.metrics.get(key) if entry is not None else None
            cells.append("" if value is None else f"{value:.4g}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def _run_row(r: record_mod.RunRecord) -> str:
    done = len(r.with_status(Status.SUCCEEDED))
    return f"{r.run_id}  {r.pipeline:<24} {r.status:<10} {done}/{len(r.stages)} stages"


def _is_key_metric(key: str) -> bool:
    """Metrics worth comparing across runs: evaluation results, not rates and counters."""
    prefix = key.split("/")[0]
    return prefix in {"test", "eval", "val", "best"} and not key.endswith(("_per_s", "/rows"))


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id (see `raypipe runs`).")],
    storage: StorageOpt = DEFAULT_STORAGE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
) -> None:
    """Shows one run: its stages, states, cache hits, times, metrics and errors."""
    from pipelines.store import Store

    record = record_mod.load_record(Store(storage), run_id)
    if as_json:
        # Redacted: a record written before credentials were kept out of records holds them.
        typer.echo(redact(json.dumps(json.loads(record.to_json()), indent=1, sort_keys=True)))
        return
    typer.echo(f"run {record.run_id}  pipeline {record.pipeline}  status {record.status}")
    for name, st in record.stages.items():
        cached = "cached" if st.cache_hit else ""
        took = f"{st.seconds:.1f}s" if isinstance(st.seconds, int | float) else ""
        typer.echo(f"  {name:<16} {st.status:<10} {cached:<7} {took:>8}  {st.uses}")
        metrics = {k: v for k, v in st.metrics.items() if isinstance(v, int | float)}
        if metrics:
            typer.echo("      " + one_line(json.dumps(metrics), 300))
        if st.error:
            typer.echo(f"      error: {one_line(st.error)}")
    if record.error:
        typer.echo(f"error: {one_line(record.error)}")


@app.command()
def report(
    run_id: Annotated[
        str | None, typer.Argument(help="A run id (see `raypipe runs`).", show_default=False)
    ] = None,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--compare",
            metavar="RUN RUN",
            help="Two runs side by side: configs and metrics, differences marked.",
        ),
    ] = None,
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """(Re)writes a run's self-contained HTML report, or with --compare a page putting two
    runs side by side; prints its path."""
    from pipelines.report import write_comparison, write_report
    from pipelines.store import Store

    if (run_id is None) == (compare is None):
        raise _fail("give one run id, or --compare RUN RUN")
    try:
        if compare is not None:
            typer.echo(redact(write_comparison(Store(storage), *compare)))
        else:
            typer.echo(redact(write_report(Store(storage), run_id)))
    except FileNotFoundError as e:
        raise _fail(str(e)) from None


def _stage_model(storage: str, run_id: str, stage: str, capability: str, what: str) -> Any:
    """The trained model of one stage of a run, built by the loader its bundle names, checked
    to have ``capability`` (a method: ``sample_grid``, ``rollout``, ``generate``...)."""
    from components.bundle import load_model
    from pipelines.store import Store

    store = Store(storage)
    record = record_mod.load_record(store, run_id)
    entry = record.stages.get(stage)
    if entry is None:
        raise _fail(f"run {run_id} has no stage {stage!r} (stages: {', '.join(record.stages)})")
    if entry.status != Status.SUCCEEDED or not entry.artifact:
        raise _fail(f"stage {stage!r} of run {run_id} has no artifact ({entry.status})")
    path = store.local_artifact(entry.artifact)
    if path is None:
        raise _fail(f"the artifact of stage {stage!r} is not on this machine: {entry.artifact}")
    try:
        model = load_model(path)
    except FileNotFoundError:
        raise _fail(f"stage {stage!r} is a {entry.uses} stage, with no trained model") from None
    if not hasattr(model, capability):
        raise _fail(
            f"stage {stage!r} is a {entry.uses} stage: its {model.bundle.kind} model does not "
            f"{what}"
        )
    return model


@app.command()
def rollout(
    run_id: Annotated[str, typer.Argument(help="A run with an rl.* stage.")],
    stage: Annotated[str, typer.Argument(help="The rl.ddpg stage.")],
    episodes: Annotated[int, typer.Option("--episodes", "-n", min=1)] = 5,
    video: Annotated[
        bool, typer.Option("--video", help="Record the first episode (GIF, or a PNG plot).")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Where the GIF/PNG goes.")] = None,
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Runs a trained policy on its own for some episodes and prints their returns."""
    policy = _stage_model(storage, run_id, stage, "rollout", "act in an env")
    returns = policy.rollout(episodes=episodes, video=video, out=out)
    for i, value in enumerate(returns):
        typer.echo(f"episode {i}: return {value:.2f}")
    mean = sum(returns) / len(returns)
    typer.echo(f"mean return over {len(returns)} episodes: {mean:.2f}")


@app.command()
def sample(
    run_id: Annotated[str, typer.Argument(help="A run with a generative.* stage.")],
    stage: Annotated[str, typer.Argument(help="The generative.vae or generative.gan stage.")],
    n: Annotated[int, typer.Option("--n", min=1, max=1024, help="Images in the grid.")] = 64,
    label: Annotated[
        int | None, typer.Option("--label", help="The class to draw (conditional models).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The PNG to write.")] = None,
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Draws samples from a trained VAE or GAN into a PNG grid; prints its path."""
    model = _stage_model(storage, run_id, stage, "sample_grid", "draw samples")
    target = out or Path(f"{stage}-samples{'' if label is None else f'-label{label}'}.png")
    try:
        typer.echo(model.sample_grid(n, label, target))
    except ValueError as e:
        raise _fail(str(e)) from None


# --- serving (issue 19) ---------------------------------------------------------------------


@app.command(
    help="Serves a model over HTTP with Ray Serve: MODEL is RUN_ID/STAGE, models:/NAME@ALIAS "
    "(the application follows the alias: a gate that moves `champion` is served by itself), "
    "models:/NAME/VERSION, or a model artifact's folder. Endpoints follow the model: POST "
    "/predict, /act, /sample or /generate; GET /healthz, /model, /docs. Without an address it "
    "runs here until Ctrl-C; with --ray-address or --address it deploys onto that cluster "
    "(detached) and returns."
)
def serve(
    model: Annotated[str, typer.Argument(help="RUN_ID/STAGE, models:/NAME@ALIAS, ...")],
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file of serving settings.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [8000].")] = None,
    name: Annotated[
        str | None, typer.Option(help="Application name [the registered model's name].")
    ] = None,
    route_prefix: Annotated[str | None, typer.Option(help="Where the endpoints live [/].")] = None,
    replicas: Annotated[int | None, typer.Option(help="Replicas [1].")] = None,
    min_replicas: Annotated[
        int | None, typer.Option(help="Autoscale from this many replicas (with --max-replicas).")
    ] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscale up to this many.")] = None,
    cpus: Annotated[
        float | None, typer.Option("--cpus-per-replica", help="CPUs per replica [1].")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per replica [its CPUs].")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Requests batched into one forward pass [32].")
    ] = None,
    batch_wait_ms: Annotated[
        float | None, typer.Option(help="How long a batch waits to fill [5 ms].")
    ] = None,
    tracking: Annotated[
        str | None,
        typer.Option(
            "--tracking",
            help="MLflow tracking URI of models:/ names [$MLFLOW_TRACKING_URI, else "
            "sqlite:///STORAGE/mlflow.db].",
        ),
    ] = None,
    storage: StorageOpt = DEFAULT_STORAGE,
    ray_address: RayAddressOpt = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Deploy through the cluster's Jobs API (http://HEAD:8265): a job deploys the "
            "application and ends; the application stays.",
        ),
    ] = None,
    settings_json: Annotated[str | None, typer.Option("--settings-json", hidden=True)] = None,
) -> None:
    from components.serve import settings as serve_settings

    flags = {
        "host": host,
        "port": port,
        "name": name,
        "route_prefix": route_prefix,
        "replicas": replicas,
        "cpus_per_replica": cpus,
        "threads": threads,
        "max_batch_size": max_batch_size,
        "batch_wait_ms": batch_wait_ms,
        "tracking_uri": tracking or os.environ.get("MLFLOW_TRACKING_URI"),
    }
    try:
        data = json.loads(settings_json) if settings_json else {}
        if config is not None:
            data = serve_settings.read_settings(config).model_dump(exclude_unset=True)
        if min_replicas is not None or max_replicas is not None:
            bounds = {"min_replicas": min_replicas, "max_replicas": max_replicas}
            scaling = {**(data.get("autoscaling") or {}), **bounds}
            data["autoscaling"] = {k: v for k, v in scaling.items() if v is not None}
        settings = serve_settings.settings_from(data, flags, where=str(config or "flags"))
    except ValueError as e:
        raise _fail(str(e)) from None
    model = _served_model(model, storage)
    if settings.tracking_uri is None and model.startswith("models:/"):
        from pipelines.store import Store
        from pipelines.tracking import default_tracking_uri

        tracking_uri = default_tracking_uri(Store(storage))
        if tracking_uri is None:
            raise _fail(f"--tracking is needed for {model}: storage {storage} is not local")
        settings = settings.model_copy(update={"tracking_uri": tracking_uri})
    if address is not None:
        _serve_through_jobs(model, settings, address)
        return
    from pipelines.engine import ensure_ray

    ray_address = _ray_address(ray_address, None)
    ensure_ray(ray_address, log_to_driver=ray_address is None)
    # Serve lives as long as the Ray it runs on: an embedded Ray is this process's (serve
    # until Ctrl-C), a cluster's outlives it (deploy and return).
    embedded = ray_address is None
    from components.serve.deploy import deploy

    try:
        deployed = deploy(model, settings)
    except (LookupError, FileNotFoundError, ValueError, RuntimeError) as e:
        _stop_serving(embedded)
        raise _fail(str(e), code=1) from None
    version = f" version {deployed['version']}" if deployed["version"] else ""
    typer.echo(f"serving {deployed['model']}{version} at {deployed['url']}")
    typer.echo(
        f"  POST {deployed['url']}{deployed['endpoint']}   GET /model /healthz   docs: /docs"
    )
    if deployed["follows"]:
        typer.echo(f"  following the alias: checked every {settings.follow_every_s:g}s")
    if not embedded:
        typer.echo(
            f"  it runs on the cluster until deleted: `serve delete {deployed['app']}` "
            "(or `serve shutdown`)"
        )
        import ray

        ray.shutdown()  # disconnects; the application is the cluster's
        return
    typer.echo("  stop: Ctrl-C")
    _serve_until_stopped()
    _stop_serving(embedded)


def _served_model(model: str, storage: str) -> str:
    """A model name the server resolves (models:/..., or a folder) from MODEL."""
    if model.startswith("models:/") or Path(model).is_dir():
        return model if model.startswith("models:/") else str(Path(model).resolve())
    run_id, sep, stage = model.partition("/")
    if not sep or not stage:
        raise _fail(
            f"{model}: expected RUN_ID/STAGE, models:/NAME@ALIAS, models:/NAME/VERSION or a "
            "model artifact's folder"
        )
    trained = _stage_model(storage, run_id, stage, "bundle", "serve")
    return str(trained.bundle.path)


def _serve_until_stopped() -> None:
    import signal
    import time

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopping")


def _stop_serving(embedded: bool) -> None:
    """Stops Serve with the embedded Ray; on a cluster only disconnects (what runs there
    stays)."""
    import ray
    from ray import serve

    if embedded:
        serve.shutdown()
    ray.shutdown()


def _serve_through_jobs(model: str, settings, address: str) -> None:
    """Deploys with a Ray job on the cluster (`serve ... --ray-address auto`), following its
    output; the application outlives the job."""
    import shlex
    import time

    from pipelines import submit as submit_mod

    client = _jobs_client(address)
    name = settings.name or model.removeprefix("models:/").split("@")[0].split("/")[0] or "model"
    args = ["serve", model, "--settings-json", settings.model_dump_json(), "--ray-address", "auto"]
    command = shlex.join(["python", "-m", "pipelines.cli", *args])
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:60]
    sid = f"raypipe-serve-{safe}-{int(time.time())}"
    root = submit_mod.project_root(Path.cwd() / "pyproject.toml")
    try:
        sub = submit_mod.submit_command(client, sid, command, root, {"raypipe_serve": name})
        typer.echo(f"submitted job {sub.submission_id} to deploy {model}")
        status = client.follow(sub.submission_id, typer.echo)
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None
    _job_exit(status)


@app.command()
def generate(
    run_id: Annotated[str, typer.Argument(help="A run with a text.lm stage.")],
    stage: Annotated[str, typer.Argument(help="The text.lm stage (or a search over one).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")] = "\n",
    tokens: Annotated[
        int, typer.Option("--tokens", "-n", min=0, max=100_000, help="Tokens to draw.")
    ] = 200,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, help="0: the most likely token.")
    ] = 1.0,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Draw from the k most likely tokens.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The same seed, the same text.")] = 0,
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Prints the prompt and a completion drawn from a trained language model."""
    model = _stage_model(storage, run_id, stage, "generate", "generate text")
    try:
        text = model.generate(prompt, tokens, temperature=temperature, top_k=top_k, seed=seed)
    except ValueError as e:
        raise _fail(str(e)) from None
    typer.echo(prompt + text)


@app.command()
def components() -> None:
    """Lists the components a pipeline can use."""
    from components import registry

    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:<18} v{cls.version:<4} {doc}")


# --- clusters: submit, jobs, cluster, schedule (issue 8) ---------------------------------

JobsAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's Jobs API (dashboard) address, http://HEAD:8265; default: "
        "$RAYPIPE_ADDRESS, else the cluster `raypipe cluster up` started.",
        envvar="RAYPIPE_ADDRESS",
        show_envvar=False,
    ),
]


def _jobs_address(address: str | None) -> str:
    """--address (or $RAYPIPE_ADDRESS, which typer reads into it), else the Jobs API of the
    cluster `raypipe cluster up` recorded (in $RAYPIPE_CLUSTER_DIR or .raypipe/cluster)."""
    if address:
        return address
    from pipelines import localcluster

    state_dir = Path(os.environ.get("RAYPIPE_CLUSTER_DIR") or localcluster.DEFAULT_STATE_DIR)
    info = localcluster.load(state_dir)
    if info is None:
        raise _fail(
            "no cluster address: pass --address http://HEAD:8265 (the Jobs API), set "
            "RAYPIPE_ADDRESS, or start a local cluster with `raypipe cluster up`"
        )
    return info.dashboard_url


def _jobs_client(address: str | None):
    from pipelines import submit as submit_mod

    try:
        return submit_mod.JobsClient(_jobs_address(address))
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None


def _job_exit(status: str) -> None:
    if status != "SUCCEEDED":
        raise _fail(f"the job ended {status}", code=1)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="Pipeline YAML file (inside the project).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="stage.key=value overrides.")
    ] = None,
    address: JobsAddressOpt = None,
    key: Annotated[
        str,
        typer.Option(
            "--key",
            help="Part of the deterministic submission id: the same file, overrides and key "
            "are one job. Change it to run again.",
        ),
    ] = "",
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job's output; exit with its outcome.")
    ] = False,
    driver_cpus: Annotated[
        float | None,
        typer.Option("--driver-cpus", help="CPUs reserved for the job's driver (default 0.25)."),
    ] = None,
    exclusive: Annotated[
        bool,
        typer.Option(
            "--exclusive", help="Submit nothing while a job of this pipeline is still running."
        ),
    ] = False,
) -> None:
    """Submits a pipeline to a Ray cluster as a Ray job; prints the submission id."""
    _load(file, overrides)  # bad input fails here, before any network call
    from pipelines import submit as submit_mod

    client = _jobs_client(address)
    try:
        sub = submit_mod.submit(
            file,
            overrides or [],
            client.address,
            key=key,
            driver_cpus=submit_mod.DEFAULT_DRIVER_CPUS if driver_cpus is None else driver_cpus,
            client=client,
            exclusive=exclusive,
        )
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None
    except spec_mod.PipelineError as e:
        raise _fail(str(e)) from None
    if sub.created:
        typer.echo(f"submitted job {sub.submission_id} ({sub.status})")
    elif sub.skipped:
        typer.echo(f"job {sub.submission_id} of this pipeline is still {sub.status}; skipped")
        return
    else:
        typer.echo(
            f"job {sub.submission_id} already exists ({sub.status}); not submitted again "
            "(use --key to run it again)"
        )
    if wait:
        try:
            status = client.follow(sub.submission_id, typer.echo)
        except submit_mod.SubmitError as e:
            raise _fail(str(e), e.code) from None
        typer.echo(f"job {sub.submission_id}: {status}")
        _job_exit(status)


jobs_app = typer.Typer(
    help="Ray jobs on a cluster: list, status, logs, stop.", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")
JobArg = Annotated[str, typer.Argument(help="The job's submission id.")]


@jobs_app.command("list")
def jobs_list(address: JobsAddressOpt = None) -> None:
    """Lists the cluster's jobs, oldest first."""
    client = _jobs_client(address)
    from pipelines import submit as submit_mod

    try:
        jobs = [j for j in client.list() if j.submission_id]
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None
    if not jobs:
        typer.echo(f"no jobs on {client.address}")
    for job in jobs:
        pipeline = (job.metadata or {}).get("raypipe_pipeline", "-")
        typer.echo(f"{job.submission_id:<44} {job.status.value:<10} {pipeline}")


@jobs_app.command("status")
def jobs_status(
    job: JobArg,
    address: JobsAddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job's details.")] = False,
) -> None:
    """Prints a job's status (exit 0 whatever it is; 2 if there is no such job)."""
    from pipelines import submit as submit_mod

    client = _jobs_client(address)
    try:
        info = client.require(job)
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None
    if as_json:
        typer.echo(submit_mod.to_json(info))
        return
    typer.echo(f"{job}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs_app.command("logs")
def jobs_logs(
    job: JobArg,
    address: JobsAddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """Prints a job's output (with --follow: until it ends, then exits with its outcome)."""
    from pipelines import submit as submit_mod

    client = _jobs_client(address)
    try:
        if follow:
            status = client.follow(job, typer.echo)
            typer.echo(f"job {job}: {status}")
            _job_exit(status)
            return
        typer.echo(client.logs(job), nl=False)
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None


@jobs_app.command("stop")
def jobs_stop(
    job: JobArg,
    address: JobsAddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it has stopped.")] = False,
) -> None:
    """Stops a job."""
    from pipelines import submit as submit_mod

    client = _jobs_client(address)
    try:
        stopped = client.stop(job)
        status = client.wait(job, timeout=120) if wait else client.status(job)
    except submit_mod.SubmitError as e:
        raise _fail(str(e), e.code) from None
    typer.echo(f"job {job}: {'stop requested' if stopped else 'had already ended'}; {status}")


cluster_app = typer.Typer(
    help="A local multi-node Ray cluster on 127.0.0.1, for development.", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")
ClusterDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Where the cluster's state (pids, ports) is kept.",
        envvar="RAYPIPE_CLUSTER_DIR",
    ),
]


@cluster_app.command("up")
def cluster_up(
    workers: Annotated[int, typer.Option("--workers", "-w", min=0, help="Worker nodes.")] = 2,
    head_cpus: Annotated[int, typer.Option("--head-cpus", min=0)] = 1,
    worker_cpus: Annotated[int, typer.Option("--worker-cpus", min=0)] = 1,
    state_dir: ClusterDirOpt = None,
) -> None:
    """Starts a head and N worker nodes with `ray start` on 127.0.0.1."""
    from pipelines import localcluster

    default = Path(localcluster.DEFAULT_STATE_DIR)
    state_dir = state_dir or default
    try:
        info = localcluster.up(
            workers, state_dir=state_dir, head_cpus=head_cpus, worker_cpus=worker_cpus
        )
    except localcluster.ClusterError as e:
        raise _fail(str(e), code=1) from None
    typer.echo(f"cluster up: {len(info.nodes)} nodes, {len(info.processes)} processes")
    typer.echo(f"  Jobs API (submit, jobs, schedule; their default): {info.dashboard_url}")
    typer.echo(
        f"  Ray (ray.init, raypipe run --ray-address): {info.gcs_address} or {info.client_address}"
    )
    typer.echo(
        f"  stop it: raypipe cluster down{'' if state_dir == default else f' --dir {state_dir}'}"
    )
    # Last and alone on its line: `eval "$(raypipe cluster up | tail -1)"` works too.
    typer.echo(f"export RAYPIPE_ADDRESS={info.dashboard_url}")


@cluster_app.command("down")
def cluster_down(state_dir: ClusterDirOpt = None) -> None:
    """Stops exactly the processes `cluster up` started (by pid)."""
    from pipelines import localcluster

    state_dir = state_dir or Path(localcluster.DEFAULT_STATE_DIR)
    info = localcluster.load(state_dir)
    if info is None:
        typer.echo(f"no cluster recorded in {state_dir}")
        return
    stopped = localcluster.down(state_dir)
    typer.echo(f"cluster down: stopped {stopped} processes")


@cluster_app.command("status")
def cluster_status(state_dir: ClusterDirOpt = None) -> None:
    """Shows the recorded cluster and how many of its processes still run."""
    from pipelines import localcluster

    state_dir = state_dir or Path(localcluster.DEFAULT_STATE_DIR)
    info = localcluster.load(state_dir)
    if info is None:
        typer.echo(f"no cluster recorded in {state_dir}")
        return
    alive = localcluster.alive_processes(info)
    typer.echo(f"gcs {info.gcs_address}  dashboard {info.dashboard_url}  nodes {len(info.nodes)}")
    typer.echo(f"{len(alive)} of {len(info.processes)} recorded processes running")


@app.command(
    help="Submits a pipeline at each cron tick: `raypipe schedule FILE [overrides] [--address "
    "URL]`, or `raypipe schedule history FILE` for the ticks so far.",
)
def schedule(
    args: Annotated[list[str], typer.Argument(help="FILE [overrides], or: history FILE.")],
    address: JobsAddressOpt = None,
    cron: Annotated[
        str | None, typer.Option("--cron", help="Cron expression (default: the file's `schedule`).")
    ] = None,
    every: Annotated[
        float | None, typer.Option("--every", help="Tick every N seconds instead of a cron.")
    ] = None,
    policy: Annotated[
        str, typer.Option("--missed", help="Missed ticks after a restart: skip | run_once.")
    ] = "skip",
    ticks: Annotated[
        int | None, typer.Option("--ticks", help="Stop after this many ticks (default: never).")
    ] = None,
    state_dir: Annotated[
        Path,
        typer.Option(
            "--state-dir", help="Lock and history live here.", envvar="RAYPIPE_SCHEDULE_DIR"
        ),
    ] = Path(".raypipe/schedules"),
    as_json: Annotated[bool, typer.Option("--json", help="history: print JSON lines.")] = False,
) -> None:
    from pipelines import schedule as schedule_mod

    if args[0] == "history":
        if len(args) != 2:
            raise _fail("usage: raypipe schedule history FILE")
        pipeline = _load(Path(args[1]), None)
        events = schedule_mod.History(state_dir, pipeline.name).read()
        if as_json:
            for event in events:
                typer.echo(json.dumps(event, sort_keys=True))
            return
        if not events:
            typer.echo(f"no ticks recorded for {pipeline.name} in {state_dir}")
        for line in schedule_mod.format_history(events):
            typer.echo(line)
        return
    file, overrides = Path(args[0]), args[1:]
    pipeline = _load(file, overrides)
    address = _jobs_address(address)
    try:
        scheduler = schedule_mod.Scheduler(
            file,
            overrides,
            address,
            # --every stands in for the file's `schedule:` (--cron and --every: refused)
            cron=cron or (None if every is not None else pipeline.spec.schedule),
            every=every,
            policy=policy,
            state_dir=state_dir,
            printer=typer.echo,
        )
        scheduler.run(max_ticks=ticks)
    except schedule_mod.ScheduleError as e:
        raise _fail(str(e), e.code) from None


def main() -> None:  # pragma: no cover - the console script calls `app`
    app(prog_name="raypipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
