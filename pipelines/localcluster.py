"""A local multi-node Ray cluster for development: ``raypipe cluster up|down``.

``up`` runs ``ray start --head`` and then ``ray start --address`` once per worker node, all on
127.0.0.1. The head takes Ray's standard ports (6379 GCS, 8265 dashboard, 10001 client) when
they are free, so the addresses in the README work as written, and free ports otherwise (a
second cluster, another user's Ray); every other port is a free one. Each node has its own
custom resource (``raypipe_head``,
``raypipe_worker_1`` ...) so a test or a stage can pin work to one node. Every node writes
under one private ``--temp-dir``; the processes whose command lines name it are this cluster's
(other people's Ray on the same machine never is), and their pids (with start times, so a
reused pid is never mistaken for ours) are saved in ``<state_dir>/cluster.json``.

``down`` stops exactly those processes and their children (the Ray workers the raylets forked),
by pid: never ``ray stop``, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
DEFAULT_STATE_DIR = ".raypipe/cluster"
#: Ray's standard head ports: GCS, dashboard (Jobs API), Ray client.
STANDARD_PORTS = (6379, 8265, 10001)


class ClusterError(RuntimeError):
    """The local cluster could not be started or stopped; the message says why."""


@dataclass
class ClusterInfo:
    """What ``up`` started; saved as JSON so ``down`` (another process) can stop it.

    Attributes:
        gcs_address: ``HOST:PORT`` of the head's GCS (``ray.init(address=...)``).
        dashboard_url: the Jobs API / dashboard (``raypipe submit --address ...``).
        client_address: ``ray://HOST:PORT`` of the head's Ray client server.
        temp_dir: the private ``--temp-dir`` every node writes under.
        nodes: per node: name, resources and ports.
        processes: ``[pid, create_time, name]`` of every Ray process ``up`` started.
    """

    gcs_address: str
    dashboard_url: str
    temp_dir: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    processes: list[list[Any]] = field(default_factory=list)
    client_address: str = ""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 (and on every interface, where Ray's dashboard
    and client server listen when asked) right now. Connections of a cluster that just stopped
    (TIME_WAIT) do not count: Ray's servers bind with SO_REUSEADDR, and so does this check."""
    for host in (HOST, "0.0.0.0"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def head_ports() -> tuple[int, int, int]:
    """The GCS, dashboard and client ports for a new head: the standard ones if all three are
    free, else three free ports (never a mix, so a cluster is either the default one or not)."""
    if all(port_is_free(p) for p in STANDARD_PORTS):
        return STANDARD_PORTS
    gcs, dashboard, client = free_ports(3)
    return gcs, dashboard, client


def _ray_bin() -> str:
    # The `ray` next to this interpreter: the venv's, whatever PATH says.
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _node_env(env: dict[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ if env is None else env)
    # Jobs run `python -m pipelines.cli ...`: the venv that started the cluster comes first.
    merged["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{merged.get('PATH', '')}"
    merged.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return merged


def _node_args(ports: list[int], cpus: float, resources: dict[str, float]) -> list[str]:
    node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics = ports
    return [
        f"--node-ip-address={HOST}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--num-cpus={int(cpus)}",
        f"--resources={json.dumps(resources)}",
        "--disable-usage-stats",
    ]


def _run(cmd: list[str], env: dict[str, str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{what}: `ray start` did not finish in {timeout:.0f}s") from None
    if done.returncode != 0:
        lines = (done.stderr + done.stdout).strip().splitlines()
        # Ray logs pages of INFO lines around its error: show the lines that are not INFO.
        tail = [line for line in lines if " INFO " not in line][-15:] or lines[-15:]
        raise ClusterError(f"{what}: `ray start` failed:\n" + "\n".join(tail))


def _ours(temp_dir: str, client_port: int) -> list[Any]:
    """The live processes whose command line names ``temp_dir``, and the head's Ray client
    server: `ray start` leaves it to init with no temp dir in its command line, so it is known
    by its port (one process per port: no other cluster's)."""
    import psutil

    client = ["-m", "ray.util.client.server", f"--port={client_port}"]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "name"]):
        cmdline = proc.info.get("cmdline") or []
        if any(temp_dir in part for part in cmdline) or all(c in cmdline for c in client):
            found.append(proc)
    return found


def up(
    workers: int = 1,
    *,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    head_cpus: float = 1,
    worker_cpus: float = 1,
    object_store_mb: int = 200,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> ClusterInfo:
    """Starts a head and ``workers`` worker nodes on 127.0.0.1; returns what it started.

    Args:
        workers: worker nodes besides the head.
        state_dir: where ``cluster.json`` is written (one cluster per directory).
        head_cpus: logical CPUs of the head (0 keeps the job drivers and tasks off it).
        worker_cpus: logical CPUs of each worker node.
        object_store_mb: object store size of each node (small: the machine is shared).
        env: environment of the Ray processes (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` ...);
            default: this process's.
        timeout: seconds to wait for each ``ray start`` and for the nodes to register.

    Raises:
        ClusterError: a cluster from this ``state_dir`` is still up, or a node failed to
            start (whatever did start is stopped again).
    """
    state = Path(state_dir)
    if (state / STATE_FILE).exists():
        raise ClusterError(
            f"a cluster started from {state} is still recorded as up; "
            "run `raypipe cluster down` first"
        )
    state.mkdir(parents=True, exist_ok=True)
    # Short on purpose: Ray puts unix sockets under it (108-byte limit on the path).
    temp_dir = f"/tmp/rp-{secrets.token_hex(4)}"
    gcs_port, dashboard_port, client_port = head_ports()
    node_ports = [p for p in free_ports(6 * (workers + 1) + 3) if p not in STANDARD_PORTS]
    info = ClusterInfo(
        gcs_address=f"{HOST}:{gcs_port}",
        dashboard_url=f"http://{HOST}:{dashboard_port}",
        temp_dir=temp_dir,
        client_address=f"ray://{HOST}:{client_port}",
    )
    node_env = _node_env(env)
    ray = _ray_bin()
    try:
        try:
            head_resources = {"raypipe_head": 1.0}
            _run(
                [
                    ray,
                    "start",
                    "--head",
                    f"--port={gcs_port}",
                    f"--temp-dir={temp_dir}",
                    "--include-dashboard=true",
                    f"--dashboard-host={HOST}",
                    f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={client_port}",
                    f"--object-store-memory={object_store_mb * 1024 * 1024}",
                    *_node_args(node_ports[:6], head_cpus, head_resources),
                ],
                node_env,
                "head node",
                timeout,
            )
            info.nodes.append({"name": "head", "cpus": head_cpus, "resources": head_resources})
            for i in range(1, workers + 1):
                resources = {f"raypipe_worker_{i}": 1.0}
                _run(
                    [
                        ray,
                        "start",
                        f"--address={info.gcs_address}",
                        f"--object-store-memory={object_store_mb * 1024 * 1024}",
                        *_node_args(node_ports[6 * i : 6 * i + 6], worker_cpus, resources),
                    ],
                    node_env,
                    f"worker node {i}",
                    timeout,
                )
                info.nodes.append(
                    {"name": f"worker_{i}", "cpus": worker_cpus, "resources": resources}
                )
        finally:
            info.processes = [
                [p.pid, p.info["create_time"], p.info["name"]] for p in _ours(temp_dir, client_port)
            ]
            _save(state, info)
        wait_for_nodes(info.gcs_address, workers + 1, env=node_env, timeout=timeout)
    except BaseException:
        # Nothing half-started stays behind, nor a record of it that `submit` would use.
        down(state_dir=state)
        raise
    return info


def wait_for_nodes(
    gcs_address: str, count: int, *, env: dict[str, str] | None = None, timeout: float = 120.0
) -> None:
    """Waits until ``count`` nodes are alive in the cluster (asked in a child process, so this
    process's own Ray, if any, is left alone).

    Raises:
        ClusterError: fewer nodes after ``timeout`` seconds.
    """
    code = (
        "import ray, sys, time\n"
        f"ray.init(address={gcs_address!r}, logging_level='ERROR')\n"
        f"deadline = time.time() + {timeout}\n"
        "while True:\n"
        "    alive = sum(n['Alive'] for n in ray.nodes())\n"
        f"    if alive >= {count} or time.time() > deadline:\n"
        "        print(alive); break\n"
        "    time.sleep(0.5)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_node_env(env),
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    lines = done.stdout.strip().splitlines()
    alive = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    if alive < count:
        raise ClusterError(
            f"only {alive} of {count} nodes came up at {gcs_address}: {done.stderr[-2000:]}"
        )


def _save(state: Path, info: ClusterInfo) -> None:
    tmp = state / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=1))
    tmp.replace(state / STATE_FILE)


def load(state_dir: str | Path = DEFAULT_STATE_DIR) -> ClusterInfo | None:
    """The cluster recorded in ``state_dir``, or None when none is up."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    return ClusterInfo(**json.loads(path.read_text()))


def _recorded(info: ClusterInfo) -> list[Any]:
    """The recorded processes that are still the same processes (pid and start time)."""
    import psutil

    procs = []
    for pid, created, _name in info.processes:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01:
                procs.append(proc)
    return procs


def down(
    state_dir: str | Path = DEFAULT_STATE_DIR, *, timeout: float = 5.0, keep_logs: bool = False
) -> int:
    """Stops the processes ``up`` started (and their children) by pid; returns how many.

    SIGTERM first so Ray's processes clean up, SIGKILL for what is left after ``timeout``.
    Removes the cluster's temp dir unless ``keep_logs`` and forgets the cluster.
    """
    import psutil

    state = Path(state_dir)
    info = load(state)
    if info is None:
        return 0
    roots = _recorded(info)
    targets: dict[int, Any] = {}
    for proc in roots:
        targets[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                targets[child.pid] = child
    me = os.getpid()
    targets.pop(me, None)
    for proc in targets.values():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(list(targets.values()), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    if not keep_logs:
        shutil.rmtree(info.temp_dir, ignore_errors=True)
    (state / STATE_FILE).unlink(missing_ok=True)
    return len(targets)


def alive_processes(info: ClusterInfo) -> list[int]:
    """Pids of the recorded processes that still run (empty after a clean ``down``)."""
    return [p.pid for p in _recorded(info) if p.is_running() and p.status() != "zombie"]
