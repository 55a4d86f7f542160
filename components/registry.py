"""Which class implements each ``uses:`` name of a pipeline file.

Entries are import paths, imported on first use, so that listing or validating components
never imports torch or RLlib. A name's first word is its folder under ``components/``.
"""

from __future__ import annotations

import importlib
from functools import cache

from components.api import Component

COMPONENTS: dict[str, str] = {
    # Small components that exercise the engine in tests and benchmarks.
    "test.sleep": "components.testing:Sleep",
    "test.fail": "components.testing:Fail",
    "data.prepare": "components.data.prepare:Prepare",
    "vision.train": "components.vision.train:VisionTrain",
    "rl.ddpg": "components.rl.stage:DDPGStage",
    "generative.vae": "components.generative.vae:VAEStage",
    "generative.gan": "components.generative.gan:GANStage",
    "tune.search": "components.tune.search:TuneSearch",
    "tune.evaluate": "components.tune.evaluate:TuneEvaluate",
}


def names() -> list[str]:
    """Returns every registered component name, sorted."""
    return sorted(COMPONENTS)


@cache
def get(name: str) -> type[Component]:
    """Returns the component class registered as ``name``.

    Raises:
        KeyError: no component has that name (the message lists the known ones).
    """
    try:
        target = COMPONENTS[name]
    except KeyError:
        raise KeyError(f"unknown component {name!r}; known: {', '.join(names())}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
