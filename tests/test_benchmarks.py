"""The benchmarks still run: the cheap ones at their smallest size, as the README calls them,
printing the JSON its performance figures are read from. Timings are not asserted; that both
sides ran and did the same work is. (A benchmark broken by a change of the engine's types went
unnoticed for a while: this is what catches that.)"""

from __future__ import annotations

import json
import subprocess
import sys

from cli_helpers import ROOT, cli_env


def benchmark(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # the Ray it starts is its own process group
    )


def results(*args: str) -> dict:
    done = benchmark(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_engine_benchmark_runs_the_chain_through_the_engine_and_as_plain_tasks():
    out = results("benchmarks/engine.py", "--only", "overhead", "--stages", "3", "--rounds", "1")
    overhead = out["overhead"]
    assert overhead["stages"] == 3 and overhead["rounds"] == 1
    engine_s, plain_s = overhead["engine_s"]["median"], overhead["plain_ray_tasks_s"]["median"]
    assert engine_s > 0 and plain_s > 0
    # The last stage is published before the run (MLflow, report) is over.
    assert 0 < overhead["engine_last_stage_done_s"]["median"] <= engine_s


def test_the_parts_benchmark_switches_each_part_off_and_only_that_part():
    parts = results("benchmarks/engine.py", "--only", "parts", "--stages", "2", "--rounds", "1")
    parts = parts["parts"]
    assert set(parts["ratio"]) == {"whole", "no_tracking", "no_report", "no_record", "none_of_them"}
    assert all(ratio["median"] > 0 for ratio in parts["ratio"].values())
    made = parts["made"]
    assert made["whole"] == made["no_record"] == {"mlflow_run": True, "report": True}
    assert made["no_tracking"] == {"mlflow_run": False, "report": True}
    assert made["no_report"] == {"mlflow_run": True, "report": False}
    assert made["none_of_them"] == {"mlflow_run": False, "report": False}


def test_the_tracking_benchmark_logs_into_both_databases_in_their_own_modes():
    out = results("benchmarks/engine.py", "--only", "tracking", "--stages", "2", "--rounds", "1")
    tracking = out["tracking"]
    assert tracking["stages"] == 2 and tracking["rounds"] == 1
    assert tracking["journal_mode"] == {"own": "wal", "named": "delete"}
    assert tracking["own_database_ms_per_stage"]["median"] > 0
    assert tracking["named_database_ms_per_stage"]["median"] > 0
    assert tracking["own_database_direct_ms_per_stage"]["median"] > 0


def test_the_cli_benchmark_runs_the_chain_in_fresh_processes_tracked_on_return():
    # (The benchmark itself checks each run is whole in MLflow when its command returns.)
    cli_run = results("benchmarks/engine.py", "--only", "cli", "--rounds", "1")["cli_run"]
    assert cli_run["stages"] == 3 and cli_run["rounds"] == 1
    assert cli_run["this_run_s"]["median"] >= cli_run["this_run_cpu_s"]["median"] / 16 > 0


def test_the_data_benchmark_writes_the_same_rows_both_ways():
    out = results("benchmarks/data.py", "--rows", "2000", "--large-rows", "0", "--repeats", "1")
    main = out["main"]
    assert out["benchmark"] == "data.prepare" and main["rows"] == 2000
    # 2 augmented copies of train beside the originals: more rows out than in, the same count.
    assert main["raypipe"]["rows_written"] == main["baseline"]["rows_written"] > 2000
    assert main["speedup"] > 0


def test_the_training_benchmark_refuses_a_run_with_nothing_past_warm_up():
    done = benchmark("benchmarks/train.py", "--epochs", "1")
    assert done.returncode == 2
    assert "--epochs must be at least 2" in done.stderr
