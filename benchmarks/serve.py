"""Serving the digits classifier: ``raypipe serve`` (Ray Serve, dynamic batching) against
``mlflow models serve`` of the same registered model and a plain FastAPI + uvicorn app around
the same torch module; then failed requests across a champion swap under load.

    .venv/bin/python benchmarks/serve.py                  # 300 requests per measurement
    .venv/bin/python benchmarks/serve.py --requests 1000 --rounds 3

It trains two small classifiers first (a pipeline in a temporary store; the gate registers
the first as ``models:/bench@champion``). Every server runs on 127.0.0.1 with one CPU-bound
worker (one replica, one uvicorn worker, one torch thread) and answers one image per request
(JSON arrays). Rounds interleave the servers: in each round every server meets every
concurrency (1, 8, 32), ``--requests`` requests each. Figures per server and concurrency:
requests/s (min/median/max over rounds) and p50/p99 latency in ms over all its requests.
``ratios``: raypipe's requests/s over each baseline's (median), ``batching_gain``: raypipe with
``max_batch_size`` 32 over the same with 1. ``swap``: requests sent by 8 clients while the gate
registers the second classifier and moves the alias, those that failed, and the versions that
answered. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only

PIPELINE = """\
name: serve-bench
storage: {storage}
stages:
  prepare:
    uses: data.prepare
    with: {{split: {{val: 0.1, test: 0.2, seed: 0}}}}
  first:
    uses: vision.train
    needs: [prepare]
    resources: {{workers: 1}}
    with: {{epochs: 2, width: 16, batch_size: 64}}
  second:
    uses: vision.train
    needs: [prepare]
    resources: {{workers: 1}}
    with: {{epochs: 4, width: 16, batch_size: 64}}
  gate:
    uses: tune.evaluate
    needs: [prepare, first]
    with: {{register_as: bench}}
"""
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_app(artifact: str, port: int) -> None:
    """The baseline a user would write: FastAPI + uvicorn, a sync handler, no batching."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from components.bundle import load_model

    torch.set_num_threads(1)
    model = load_model(artifact)
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        x = np.asarray(body["inputs"], np.float32)
        p = np.asarray(model.probabilities(x))
        return {
            "predictions": [{"label_id": int(r.argmax()), "probabilities": r.tolist()} for r in p]
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Waits for ``url`` to answer 200; fails at once, with ``log``'s tail, if ``proc`` ends."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s")


def load(url: str, body: bytes, requests_n: int, concurrency: int) -> tuple[float, list, int]:
    """``requests_n`` POSTs at ``concurrency``: (requests/s, latencies in ms, failures)."""
    import requests

    local = threading.local()
    headers = {"Content-Type": "application/json"}

    def one(_i: int) -> float | None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        start = time.perf_counter()
        try:
            ok = session.post(url, data=body, headers=headers, timeout=60).status_code == 200
        except requests.RequestException:
            ok = False
        return (time.perf_counter() - start) * 1000 if ok else None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_n)))
    seconds = time.perf_counter() - start
    latencies = [r for r in results if r is not None]
    return len(latencies) / seconds, latencies, len(results) - len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    # Only the JSON goes to stdout: Ray prints its raylet's warnings there.
    out, sys.stdout = sys.stdout, sys.stderr

    import ray
    import requests
    from ray import serve

    from components.data.dataset import load_numpy
    from components.serve.deploy import deploy
    from components.serve.settings import ServeSettings
    from components.tune.evaluate import EvaluateConfig, gate
    from pipelines import engine, spec

    tmp = Path(tempfile.mkdtemp(prefix="raypipe-serve-bench-"))
    (tmp / "p.yaml").write_text(PIPELINE.format(storage=tmp / "store"))
    # log_to_driver=False: the workers' log lines stay in the session logs, out of the JSON
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    record = engine.run_pipeline(spec.load(tmp / "p.yaml"), printer=lambda _line: None)
    assert record.ok, record.error
    uri = record.tracking
    x, _ = load_numpy(Path(record.stages["prepare"].artifact), "test")
    body = json.dumps({"inputs": x[:1].tolist()}).encode()

    port = free_port()
    base = ServeSettings(port=port, tracking_uri=uri, follow_every_s=1.0, cpus_per_replica=1)
    batched = base.model_copy(update={"name": "batched", "route_prefix": "/b"})
    single = base.model_copy(update={"name": "single", "route_prefix": "/u", "max_batch_size": 1})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    # `mlflow models serve` runs `uvicorn` by name: this interpreter's scripts come first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    logs = {name: tmp / f"{name}.log" for name in ("mlflow", "plain")}
    procs = []
    try:
        deploy("models:/bench@champion", batched)
        deploy("models:/bench@champion", single)
        mlflow_port, plain_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "models",
                    "serve",
                    "-m",
                    "models:/bench@champion",
                    "--env-manager",
                    "local",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(mlflow_port),
                    "-w",
                    "1",
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=logs["mlflow"].open("w"),
            )  # fmt: skip
        )
        artifact = record.stages["first"].artifact
        code = f"import benchmarks.serve as b; b.plain_app({artifact!r}, {plain_port})"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=logs["plain"].open("w"),
            )  # fmt: skip
        )
        servers = {
            "raypipe": f"http://127.0.0.1:{port}/b/predict",
            "raypipe_unbatched": f"http://127.0.0.1:{port}/u/predict",
            "mlflow_models_serve": f"http://127.0.0.1:{mlflow_port}/invocations",
            "fastapi_uvicorn": f"http://127.0.0.1:{plain_port}/predict",
        }
        wait_up(f"http://127.0.0.1:{mlflow_port}/ping", procs[0], logs["mlflow"])
        wait_up(f"http://127.0.0.1:{plain_port}/docs", procs[1], logs["plain"])
        for url in servers.values():  # warm up: first requests load lazily
            assert requests.post(url, data=body, timeout=120, headers={
                "Content-Type": "application/json"}).status_code == 200, url  # fmt: skip
        rates: dict = {s: {c: [] for c in CONCURRENCY} for s in servers}
        latencies: dict = {s: {c: [] for c in CONCURRENCY} for s in servers}
        failed = 0
        for _ in range(args.rounds):
            for c in CONCURRENCY:
                for name, url in servers.items():
                    rate, lat, bad = load(url, body, args.requests, c)
                    rates[name][c].append(rate)
                    latencies[name][c] += lat
                    failed += bad
        figures = {
            name: {
                str(c): {
                    "rps_min": round(min(rates[name][c]), 1),
                    "rps_median": round(statistics.median(rates[name][c]), 1),
                    "rps_max": round(max(rates[name][c]), 1),
                    "p50_ms": round(float(np.percentile(latencies[name][c], 50)), 2),
                    "p99_ms": round(float(np.percentile(latencies[name][c], 99)), 2),
                }
                for c in CONCURRENCY
            }
            for name in servers
        }

        def med(name: str, c: int) -> float:
            return statistics.median(rates[name][c])

        ratios = {
            f"vs_{b}": {str(c): round(med("raypipe", c) / med(b, c), 2) for c in CONCURRENCY}
            for b in ("mlflow_models_serve", "fastapi_uvicorn")
        }
        gain = {str(c): round(med("raypipe", c) / med("raypipe_unbatched", c), 2)
                for c in CONCURRENCY}  # fmt: skip

        # The swap: 8 clients without pause while the gate moves the alias.
        seen, errors, stop = [], [], threading.Event()

        def client() -> None:
            with requests.Session() as s:
                while not stop.is_set():
                    try:
                        r = s.post(servers["raypipe"], data=body, timeout=60)
                        if r.status_code == 200:
                            seen.append(r.headers["X-Model-Version"])
                        else:
                            errors.append(r.status_code)
                    except requests.RequestException as e:
                        errors.append(repr(e))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        second = record.stages["second"]
        decision = gate(uri, "bench", second.artifact, second.metrics,
                        EvaluateConfig(register_as="bench", metric="test/accuracy"),
                        tags={"raypipe.run_id": record.run_id, "raypipe.stage": "second",
                              "raypipe.digest": json.loads(
                                  (Path(second.artifact) / "manifest.json").read_text())["digest"]},
                        log_model=True)  # fmt: skip
        assert decision.promoted, decision  # 4 epochs beat 2 on the digits
        deadline = time.time() + 120
        while time.time() < deadline and (not seen or seen[-1] != decision.version):
            time.sleep(0.2)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=70)
        swap = {
            "requests": len(seen) + len(errors),
            "failed": len(errors),
            "versions": sorted(set(seen)),
            "promoted_version": decision.version,
        }
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()
    print(
        json.dumps(
            {
                "requests_per_measurement": args.requests,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "failed_requests": failed,
                "servers": figures,
                "ratios": ratios,
                "batching_gain": gain,
                "swap": swap,
            },
            indent=1,
        ),
        file=out,
    )


if __name__ == "__main__":
    main()
