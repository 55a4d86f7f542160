"""Sends pipelines to a Ray cluster as Ray jobs (Jobs API): submit, status, logs, stop.

A submitted job ships the project as its ``runtime_env.working_dir`` (without the venv, runs,
data, checkpoints and caches) and runs ``python -m pipelines.cli run FILE [overrides]
--ray-address auto`` on the cluster, so the driver connects to the job's own cluster. Which
folder is the project is said explicitly, never taken from where raypipe was installed (see
:func:`project_root`).

A job runs once: a retry is the submitter's business. The submission id is deterministic
(pipeline name + a digest of the resolved pipeline, its overrides and a key), so submitting
the same thing twice finds the first job instead of starting a second.

Token authentication (``RAY_AUTH_MODE=token``): the token is read the way Ray reads it
(``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) and
sent as an ``Authorization: Bearer`` header. It is never printed, logged, put in the job's
runtime_env or metadata, or written to a run record; the job's driver authenticates with the
cluster's own token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import spec as spec_mod
from pipelines.spec import Pipeline
from pipelines.store import canonical_json

#: Names the directory shipped as a job's working_dir (see :func:`project_root`).
PROJECT_ENV = "RAYPIPE_PROJECT"
# Never shipped: environments, outputs, data, checkpoints and caches (the upload cap is ~512 MiB).
# Ray reads these as .gitignore lines: a bare `data` would also drop `components/data` (the
# data stage's code), so the project's own top-level folders are anchored with a leading `/`.
EXCLUDES = [
    "/.venv",
    "/venv",
    ".git",
    "/runs",
    "/data",
    "/checkpoints",
    "/mlruns",
    ".raypipe",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "/build",
    "/dist",
    "/.whl",
    "/.gl",
]
DEFAULT_DRIVER_CPUS = 0.25
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A submission or a job command failed; ``code`` is the CLI exit code (1 job, 2 input)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Submission:
    """The outcome of :func:`submit`.

    Attributes:
        submission_id: the job's id on the cluster.
        created: False when a job with this id already existed (nothing new was started).
        status: the job's status right after the call.
        entrypoint: the command the job runs.
        skipped: ``exclusive`` found another job of the pipeline running (that job's id is
            ``submission_id``).
    """

    submission_id: str
    created: bool
    status: str
    entrypoint: str
    skipped: bool = False


# --- authentication -----------------------------------------------------------------------


def auth_token() -> str | None:
    """The Ray auth token, found where Ray looks for it; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    for candidate in ([Path(path)] if path else []) + [Path.home() / ".ray" / "auth_token"]:
        try:
            token = candidate.expanduser().read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def dashboard_url(address: str) -> str:
    """``HOST:PORT`` or ``http(s)://HOST:PORT`` as an http(s) URL of the Jobs API."""
    address = address.strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    return address


def _auth_problem(status: int, address: str) -> str:
    # Built here, not from the server's body, so nothing the server echoes can leak a token.
    if status == 401:
        return (
            f"the Ray cluster at {address} requires token authentication and no token was "
            "sent: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it "
            "(default ~/.ray/auth_token)"
        )
    return (
        f"the Ray cluster at {address} rejected the authentication token (HTTP {status}): "
        "check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token"
    )


def _explain(error: Exception, address: str) -> SubmitError:
    from ray.exceptions import AuthenticationError

    text = str(error)
    if isinstance(error, AuthenticationError):
        rejected = "invalid or incorrect" in text or "status code 403" in text
        return SubmitError(_auth_problem(403 if rejected else 401, address))
    for status in (401, 403):
        if f"status code {status}" in text or f"{status} " in text[:40]:
            return SubmitError(_auth_problem(status, address))
    if isinstance(error, ConnectionError) or "Failed to connect" in text:
        return SubmitError(
            f"cannot reach the Ray Jobs API at {address}: is the cluster up, and is this the "
            "dashboard address (http://HEAD:8265, not the GCS port 6379)?"
        )
    token = auth_token()
    if token:
        text = text.replace(token, "***")
    return SubmitError(f"Ray Jobs API at {address}: {text.strip()[:1000]}", code=1)


class JobsClient:
    """A ``JobSubmissionClient`` for one cluster, with clear errors and the auth header.

    Args:
        address: the dashboard (Jobs API) address, ``http://HEAD:8265``.

    Raises:
        SubmitError: the cluster is unreachable or refuses the token.
    """

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = dashboard_url(address)
        # Ray logs every file it packages and every websocket it closes at INFO: keep warnings.
        for name in (
            "ray._private.runtime_env.packaging",
            "ray.dashboard.modules.dashboard_sdk",
            "ray.dashboard.modules.job.sdk",
        ):
            logging.getLogger(name).setLevel(logging.WARNING)
        token = auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.client = JobSubmissionClient(self.address, headers=headers)
            # The constructor only checks the version route, which needs no auth: ask for
            # something that does, so a missing or wrong token fails here, clearly.
            self.client.list_jobs()
        except Exception as e:  # noqa: BLE001 - every failure becomes a clear SubmitError
            raise _explain(e, self.address) from None

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise _explain(e, self.address) from None

    def alive_nodes(self) -> int:
        """How many nodes of the cluster are alive (state API)."""
        response = self._call(
            self.client._do_request, "GET", "/api/v0/nodes?limit=10000&detail=false"
        )
        if response.status_code != 200:
            raise _explain(
                RuntimeError(f"status code {response.status_code}: {response.text[:200]}"),
                self.address,
            )
        nodes = response.json()["data"]["result"]["result"]
        return sum(node.get("state") == "ALIVE" for node in nodes)

    def info(self, submission_id: str) -> Any | None:
        """The job's ``JobDetails``, or None when there is no such job."""
        try:
            return self.client.get_job_info(submission_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return None
            raise _explain(e, self.address) from None
        except Exception as e:  # noqa: BLE001
            raise _explain(e, self.address) from None

    def require(self, submission_id: str) -> Any:
        """The job's details; a clear error (exit 2) when there is no such job."""
        info = self.info(submission_id)
        if info is None:
            raise SubmitError(f"no job {submission_id!r} on the cluster at {self.address}")
        return info

    def status(self, submission_id: str) -> str:
        """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self.require(submission_id).status.value)

    def list(self) -> list[Any]:
        """Every job the cluster knows, oldest first."""
        jobs = self._call(self.client.list_jobs)
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def logs(self, submission_id: str) -> str:
        """The job's driver output so far."""
        self.require(submission_id)
        return self._call(self.client.get_job_logs, submission_id)

    def follow(self, submission_id: str, printer: Callable[[str], None]) -> str:
        """Prints the job's output as it comes until the job ends; returns its final status."""
        self.require(submission_id)

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                printer(chunk.rstrip("\n"))

        try:
            asyncio.run(tail())
        except Exception as e:  # noqa: BLE001 - the stream broke: fall back to polling
            printer(f"(log stream interrupted: {type(e).__name__}; waiting for the job)")
        return self.wait(submission_id)

    def wait(self, submission_id: str, timeout: float | None = None, poll: float = 1.0) -> str:
        """Waits until the job ends; returns its final status (or the current one at timeout)."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            status = self.status(submission_id)
            if status in TERMINAL or (deadline is not None and time.time() > deadline):
                return status
            time.sleep(poll)

    def stop(self, submission_id: str) -> bool:
        """Asks the cluster to stop the job; False when it had already ended."""
        self.require(submission_id)
        return bool(self._call(self.client.stop_job, submission_id))


# --- submission ----------------------------------------------------------------------------


def submission_id(pipeline: Pipeline, key: str = "") -> str:
    """A deterministic job id: ``raypipe-<name>-<digest>``.

    The digest covers the resolved pipeline (overrides applied), the overrides as written and
    ``key``: the same pipeline submitted twice with the same key is the same job. Use a new key
    (a date, a tick time, a build number) to run it again.
    """
    payload = {"pipeline": pipeline.to_dict(), "overrides": list(pipeline.overrides), "key": key}
    digest = hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in pipeline.name)[:60]
    return f"raypipe-{name}-{digest}"


def project_root(file: str | Path) -> Path:
    """The directory shipped to the cluster as the job's working_dir, for a pipeline file.

    1. ``$RAYPIPE_PROJECT`` when it is set (the image sets it to its copy of the project);
    2. else the nearest directory at or above the pipeline file that holds a
       ``pyproject.toml`` (a checkout of this project, or a project of your own);
    3. else the pipeline file's own directory (a folder of pipeline files: the cluster then
       runs the raypipe installed there).

    Never the place raypipe was installed from: a non-editable install (``pip install .``)
    puts ``pipelines`` in site-packages, which holds no pipeline file of yours.
    """
    explicit = os.environ.get(PROJECT_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser().resolve()
    path = Path(file).resolve()
    for folder in path.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return path.parent


def project_path(file: str | Path, root: Path | None = None) -> str:
    """The pipeline file's path inside the project (what the job sees in its working_dir).

    Raises:
        SubmitError: the file is outside the project, so it would not be shipped.
    """
    root = project_root(file) if root is None else root
    path = Path(file).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(
            f"{file}: the pipeline file must be inside the project ({root}, from "
            f"${PROJECT_ENV}), which is what is shipped to the cluster as the job's "
            f"working_dir; move it there or point ${PROJECT_ENV} at a folder holding it"
        ) from None


def check_storage(pipeline: Pipeline, nodes: int, address: str) -> None:
    """Refuses storage that the job's stages could not share.

    Raises:
        SubmitError: a local path on a multi-node cluster (each node would write its own
            disk), or a relative path (it would land in the job's temporary working_dir).
    """
    storage = pipeline.storage
    if "://" in storage:
        return
    if nodes > 1:
        raise SubmitError(
            f"{pipeline.source}: storage {storage!r} is a local path, but the cluster at "
            f"{address} has {nodes} nodes: each node would write to its own disk and stages "
            "on other nodes would not find the artifacts. Use storage that every node shares: "
            "s3://bucket/prefix, gs://bucket/prefix, or file:///path on a filesystem every "
            "node mounts (NFS), e.g. `storage=s3://bucket/runs` as an override"
        )
    if not Path(storage).is_absolute():
        raise SubmitError(
            f"{pipeline.source}: storage {storage!r} is a relative path; on the cluster it "
            "would be inside the job's temporary working_dir and lost when the job ends. "
            "Use an absolute path on the cluster or a URI (s3://, gs://, file:///)"
        )


def entrypoint(relpath: str, overrides: tuple[str, ...] | list[str]) -> str:
    """The shell command the job runs on the cluster."""
    args = ["python", "-m", "pipelines.cli", "run", relpath, *overrides, "--ray-address", "auto"]
    return shlex.join(args)


def submit(
    file: str | Path,
    overrides: list[str] | tuple[str, ...],
    address: str,
    *,
    key: str = "",
    driver_cpus: float = DEFAULT_DRIVER_CPUS,
    metadata: dict[str, str] | None = None,
    client: JobsClient | None = None,
    exclusive: bool = False,
) -> Submission:
    """Submits a pipeline as a Ray job, or finds the job already submitted with the same id.

    Args:
        file: the pipeline file (inside the project, :func:`project_root`).
        overrides: ``stage.key=value`` overrides, applied on the cluster as here.
        address: the cluster's dashboard address, ``http://HEAD:8265``.
        key: makes the submission id differ for what is meant as a new run.
        driver_cpus: CPUs reserved for the job's driver, so it lands on a node that has CPUs
            (a KubeRay head usually has ``num-cpus: 0``).
        metadata: extra job metadata (strings).
        client: an open client (else one is made for ``address``).
        exclusive: if a job of this pipeline is pending or running, submit nothing and
            return that job (``created`` False): overlap protection for cron-driven submits.

    Raises:
        PipelineError: the file or an override is invalid (checked here, before any upload).
        SubmitError: the cluster is unreachable, refuses the token, or the storage is not
            shared; or the submission failed.
    """
    pipeline = spec_mod.load(file, list(overrides))
    root = project_root(file)
    relpath = project_path(file, root)
    client = client or JobsClient(address)
    sid = submission_id(pipeline, key)
    command = entrypoint(relpath, pipeline.overrides)
    existing = client.info(sid)
    if existing is not None:
        return Submission(sid, False, str(existing.status.value), existing.entrypoint)
    if exclusive:
        busy = running_jobs(client, pipeline.name)
        if busy:
            return Submission(busy[0], False, client.status(busy[0]), "", skipped=True)
    check_storage(pipeline, client.alive_nodes(), client.address)
    meta = {"raypipe_pipeline": pipeline.name, "raypipe_file": relpath, "raypipe_key": key}
    meta.update(metadata or {})
    return submit_command(client, sid, command, root, meta, driver_cpus)


def submit_command(
    client: JobsClient,
    sid: str,
    command: str,
    root: Path,
    metadata: dict[str, str],
    driver_cpus: float = DEFAULT_DRIVER_CPUS,
) -> Submission:
    """Submits ``command`` as job ``sid`` with the project folder ``root`` as its working_dir
    (or finds the job a racing submitter made with that id)."""
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES}
    try:
        client.client.submit_job(
            entrypoint=command,
            submission_id=sid,
            runtime_env=runtime_env,
            entrypoint_num_cpus=driver_cpus,
            metadata=metadata,
        )
    except Exception as e:  # noqa: BLE001
        # Two submitters raced: the other one's job is the job.
        if "already exists" in str(e):
            info = client.require(sid)
            return Submission(sid, False, str(info.status.value), info.entrypoint)
        raise _explain(e, client.address) from None
    return Submission(sid, True, client.status(sid), command)


def running_jobs(client: JobsClient, pipeline: str) -> list[str]:
    """Submission ids of the pipeline's jobs that are pending or running."""
    return [
        job.submission_id
        for job in client.list()
        if (job.metadata or {}).get("raypipe_pipeline") == pipeline
        and str(job.status.value) not in TERMINAL
    ]


def describe(job: Any) -> dict[str, Any]:
    """A job's details as plain data (for ``--json`` and the scheduler's history)."""
    return {
        "submission_id": job.submission_id,
        "status": str(job.status.value),
        "entrypoint": job.entrypoint,
        "message": job.message,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "metadata": job.metadata or {},
        "driver_node_id": getattr(job, "driver_node_id", None),
    }


def to_json(job: Any) -> str:
    """One job as indented JSON."""
    return json.dumps(describe(job), indent=1, sort_keys=True)
