"""Which class implements each ``uses:`` name of a pipeline file: one line per name.

Entries are import paths, imported on first use, so that listing or validating components
never imports torch or RLlib. A name's first word is its folder under ``components/``. A
training component names its family's hooks itself (``Component.trainable``), so adding a model
family is one folder and one line here.

More components (a project's own, or the tests' engine exercisers) are registered by naming
modules in ``RAYPIPE_COMPONENTS`` (comma-separated): each module's ``COMPONENTS`` dict is added
to this one. Processes started from this one (Ray workers, job drivers) inherit the variable.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.api import Component
    from components.contract import Mode, Trainable

COMPONENTS: dict[str, str] = {
    "data.prepare": "components.data.prepare:Prepare",
    "vision.train": "components.vision.train:VisionTrain",
    "generative.vae": "components.generative.vae:VAEStage",
    "generative.gan": "components.generative.gan:GANStage",
    "rl.ddpg": "components.rl.ddpg:DDPGStage",
    "tabular.mlp": "components.tabular.mlp:MLPStage",
    "text.prepare": "components.text.prepare:TextPrepare",
    "text.classifier": "components.text.classifier:TextClassifier",
    "text.lm": "components.text.lm:LanguageModelStage",
    "tune.search": "components.tune.search:TuneSearch",
    "tune.evaluate": "components.tune.evaluate:TuneEvaluate",
    "model.compress": "components.model.compress:Compress",
    "serve.deploy": "components.serve.deploy:ServeDeploy",
}

PLUGINS_ENV = "RAYPIPE_COMPONENTS"


@cache
def _table() -> dict[str, str]:
    """The built-in components and those of the modules ``RAYPIPE_COMPONENTS`` names.

    Raises:
        InputError: the variable names a module that cannot be imported, or one without a
            ``COMPONENTS`` dict of names to ``module:Class`` paths (the environment is the
            user's input: one line, exit 2, not a bug of raypipe's).
    """
    from pipelines.guards import InputError

    table = dict(COMPONENTS)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            extra = importlib.import_module(module).COMPONENTS
        except ImportError as e:
            raise InputError(
                f"${PLUGINS_ENV}", None, f"module {module!r} cannot be imported here: {e}"
            ) from None
        except AttributeError:
            extra = None
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and ":" in v for k, v in extra.items()
        ):
            raise InputError(
                f"${PLUGINS_ENV}",
                None,
                f"module {module!r} has no COMPONENTS dict of names to 'module:Class' paths",
            )
        table.update(extra)
    return table


def names() -> list[str]:
    """Returns every registered component name, sorted."""
    return sorted(_table())


@cache
def get(name: str) -> type[Component]:
    """Returns the component class registered as ``name``.

    Raises:
        KeyError: no component has that name (the message lists the known ones).
    """
    try:
        target = _table()[name]
    except KeyError:
        raise KeyError(f"unknown component {name!r}; known: {', '.join(names())}") from None
    return _import(target)


def trainable_names() -> list[str]:
    """The components that train a model with family hooks (searchable, gateable), sorted."""
    return [name for name in names() if get(name).trainable]


@cache
def trainable(name: str) -> Trainable:
    """The hooks of the model family trained by component ``name``.

    Raises:
        KeyError: unknown component.
        ValueError: the component trains no model with hooks (the message lists those that do).
    """
    path = get(name).trainable
    if not path:
        known = ", ".join(trainable_names())
        raise ValueError(f"{name!r} cannot be tuned or gated; these can: {known}")
    return _import(path)


@cache
def metric_modes() -> dict[str, Mode]:
    """Every metric any family reports or is scored on, with the direction that is better."""
    modes: dict[str, Mode] = {}
    for name in trainable_names():
        modes.update(trainable(name).metric_modes)
    return modes


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
