"""Engine overhead and cached-rerun figures, as JSON.

    .venv/bin/python benchmarks/engine.py [--stages 20] [--repeats 3]

1. A chain of N trivial stages run by the engine, against the same component code run as a
   chain of plain Ray tasks in the same process (same Ray instance): the ratio and the
   per-stage overhead in ms. Goal: ratio under 1.5.
2. The wall time of `raypipe run pipelines/demo.yaml` when every stage is cached (a fresh
   process each time, as a user runs it). Goal: under 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The chain's stages are the tests' engine exercisers (test.sleep), registered by name.
os.environ.setdefault("RAYPIPE_COMPONENTS", "tests.engine_components")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.api import InputArtifact, Resources, StageContext  # noqa: E402
from pipelines import engine, spec  # noqa: E402
from tests.engine_components import Sleep  # noqa: E402


def plain_stage(prev_dir: str | None, out_dir: str, value: float) -> str:
    """The same component work as one engine stage, with no engine around it."""
    inputs = {}
    if prev_dir:
        inputs["prev"] = InputArtifact(
            "prev",
            Path(prev_dir),
            {"component": "test.sleep", "kind": "test/value", "files": {"out.json": {}}},
        )
    ctx = StageContext(
        stage="s",
        run_id="plain",
        out_dir=Path(out_dir),
        scratch_dir=out_dir,
        inputs=inputs,
        resources=Resources(),
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Sleep().run(ctx, Sleep.Config(value=value))
    return out_dir


def chain_yaml(n: int, storage: Path) -> str:
    lines = [f"name: bench-chain\nstorage: {storage}\nstages:"]
    for i in range(n):
        needs = f", needs: [s{i - 1}]" if i else ""
        lines.append(f"  s{i}: {{uses: test.sleep, with: {{value: {i}}}{needs}}}")
    return "\n".join(lines) + "\n"


def bench_overhead(n: int, repeats: int) -> dict:
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    remote_plain = ray.remote(num_cpus=0, max_retries=0)(plain_stage)
    ray.get(remote_plain.remote(None, tempfile.mkdtemp(), 0))  # warm a worker
    engine_s, plain_s = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "chain.yaml"
            path.write_text(chain_yaml(n, Path(tmp) / "store"))
            pipeline = spec.load(path)
            t0 = time.perf_counter()
            record = engine.run_pipeline(pipeline, printer=lambda _line: None)
            engine_s.append(time.perf_counter() - t0)
            assert record.ok and not any(s["cache_hit"] for s in record.stages.values())
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            prev = None
            for i in range(n):
                prev = ray.get(remote_plain.remote(prev, f"{tmp}/s{i}", i))
            plain_s.append(time.perf_counter() - t0)
    ray.shutdown()
    best_engine, best_plain = min(engine_s), min(plain_s)
    return {
        "stages": n,
        "engine_s": round(best_engine, 3),
        "plain_ray_tasks_s": round(best_plain, 3),
        "ratio": round(best_engine / best_plain, 3),
        "overhead_ms_per_stage": round(1000 * (best_engine - best_plain) / n, 1),
        "goal_ratio_under": 1.5,
    }


def bench_cached_demo(repeats: int) -> dict:
    exe = Path(sys.executable).with_name("raypipe")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(exe), "run", str(ROOT / "pipelines" / "demo.yaml"), f"storage={tmp}/store"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=tmp)
        first = time.perf_counter() - t0
        cached = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=tmp)
            cached.append(time.perf_counter() - t0)
            assert out.stdout.count(": cached") >= 1, out.stdout
    return {
        "demo_first_run_s": round(first, 2),
        "demo_cached_rerun_s": round(min(cached), 3),
        "goal_cached_under_s": 5.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {"overhead": bench_overhead(args.stages, args.repeats)}
    result["cached_rerun"] = bench_cached_demo(args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
