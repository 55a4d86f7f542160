"""Tiny components that exercise the engine: they sleep, add numbers, write bytes, or fail.

They do real file work through the same contract as every other component, so the engine's
tests and benchmarks run the engine exactly as the training stages do. They are not part of the
product: ``tests/conftest.py`` (and ``benchmarks/engine.py``) register them by naming this
module in ``RAYPIPE_COMPONENTS``, which the processes they start inherit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from components.api import Component, StageContext, StrictModel


class SleepConfig(StrictModel):
    """Attributes:
    seconds: how long the stage works.
    value: a number added to the sum of the inputs' values; the result is the output.
    payload_bytes: size of an extra data file written into the artifact.
    steps: progress points reported (``step``, ``train/loss`` falling as 1/(step+1)).
    say: a line printed to the worker's stdout and stderr (as libraries in a stage do).
    """

    seconds: float = 0.0
    value: float = 1.0
    payload_bytes: int = 0
    steps: int = 0
    say: str = ""


class Sleep(Component):
    """Sleeps, then writes ``value + sum(inputs' values)`` to ``out.json``."""

    version = "1"
    Config = SleepConfig
    produces = "test/value"

    def run(self, ctx: StageContext, config: SleepConfig) -> dict[str, Any]:
        start = time.time()
        if config.say:
            print(config.say, flush=True)
            print(config.say, file=sys.stderr, flush=True)
        total = config.value
        for artifact in ctx.inputs.values():
            total += json.loads(artifact.file("out.json").read_text())["value"]
        for step in range(config.steps):
            ctx.report(step=step, **{"train/loss": 1.0 / (step + 1)})
        deadline = start + config.seconds
        while (left := deadline - time.time()) > 0:
            time.sleep(min(left, 0.05))
        (ctx.out_dir / "out.json").write_text(json.dumps({"value": total, "pid": os.getpid()}))
        if config.payload_bytes:
            (ctx.out_dir / "payload.bin").write_bytes(os.urandom(config.payload_bytes))
        return {"value": total, "started": start, "finished": time.time()}


class FailConfig(StrictModel):
    """Attributes:
    message: the error the stage raises.
    """

    message: str = "this stage always fails"


class Fail(Component):
    """Raises an error after writing a file, to show that nothing half-done is published."""

    version = "1"
    Config = FailConfig
    produces = "test/value"

    def run(self, ctx: StageContext, config: FailConfig) -> dict[str, Any]:
        (ctx.out_dir / "partial.txt").write_text("written before the failure")
        raise RuntimeError(config.message)


COMPONENTS = {
    "test.sleep": "tests.engine_components:Sleep",
    "test.fail": "tests.engine_components:Fail",
}
