"""One model bundle for every family: what a trained model is, on disk.

    <artifact>/bundle.json   what the model is: the component that trained it, its artifact kind,
                             its loader, its input and output spec, label names, architecture
                             (``hparams``), the resolved training config, metrics, family facts
    <artifact>/weights.pt    its tensors, ``{"model": state_dict, ...}``, loaded with
                             ``torch.load(weights_only=True)``: no pickled code ever runs

:func:`load_model` imports the bundle's loader (``module:function``, named by the family that
wrote it) and returns what it builds: the family's inference object (its ``module`` in eval mode
on the CPU, its ``bundle``, and the family's own methods: ``predict``, ``sample``, ``act``,
``generate``...). The CLI, the gate, compression and serving find every model this way, so none
of them imports a family's code.

The input spec (``input``) says what the model takes, so that serving can check requests and
compression can calibrate; its ``type`` is one of:

- ``image``: ``shape`` [C, H, W], float32 normalized by ``normalization`` (see
  ``components/data/normalization.py``; ``pixel_scale`` is the raw pixel maximum);
- ``table``: ``columns`` (numeric, normalized) and ``categorical`` columns;
- ``text``: token ids of the tokenizer saved in the artifact (``tokenizer``);
- ``vector``: ``shape`` [D] floats (an RL observation), with ``low``/``high`` where bounded;
- ``latent``: a generator's noise, ``latent_dim`` floats (and a label if ``num_classes``).

What the inference object offers follows the bundle's ``output`` type, so that serving, the CLI
and the gate can use any family's model:

- ``classes``: ``predict(inputs)`` (label ids) and ``probabilities(inputs)`` ((N, C) floats);
- ``value`` (regression): ``predict(inputs)``, in the target's own units;
- ``image`` (generators): ``sample(n, label=None, seed=0)`` (pixels in [0, 1], (N, C, H, W))
  and ``sample_grid(n, label, out, seed=0)``;
- ``action`` (policies): ``act(observations)`` and ``rollout(episodes, ...)``;
- ``tokens`` (language models): ``generate(prompt, tokens, temperature=1.0, top_k=None,
  seed=0)`` (the completion, a string).

``inputs`` are what a user holds, in the input spec's terms: normalized float32 arrays for
``image`` (``normalization`` maps raw pixels there), a list of strings for ``text``, row dicts or
a pandas DataFrame of raw column values for ``table``, float arrays for ``vector``.

This module imports only the standard library; torch loads when weights are read.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = "raypipe.bundle/1"


@dataclass(frozen=True)
class Bundle:
    """A trained model's description (``bundle.json``) and, once read, its weights.

    Attributes:
        component: the ``uses:`` name of the component that trained it (``vision.train``).
        kind: its artifact kind (``model/classifier``), what consumers ask for.
        loader: ``module:function`` that builds the inference object from this bundle.
        input: what the model takes (see the module docstring).
        output: what it gives (``classes``, ``image``, ``action``, ``tokens``, ``value``...).
        labels: the class names, where the model predicts or draws classes.
        hparams: the architecture, as the family's module rebuilds it.
        config: the resolved config of the stage that trained it.
        metrics: its numeric metrics (test scores) when it was exported (others are dropped).
        meta: family facts the loader needs (normalization, env, tokenizer file...).
        path: the artifact directory it was read from (None for a bundle in memory).
        format: the bundle format version.
    """

    component: str
    kind: str
    loader: str
    input: dict[str, Any]
    output: dict[str, Any]
    hparams: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    format: str = FORMAT
    tensors: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def weights(self) -> dict[str, Any]:
        """The saved tensors (``{"model": state_dict, ...}``), read once from ``weights.pt``."""
        if self.tensors is not None:
            return self.tensors
        if self.path is None:
            raise ValueError(f"bundle of {self.component} has neither weights nor a path")
        import torch

        tensors = torch.load(self.path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        object.__setattr__(self, "tensors", tensors)
        return tensors

    def in_memory(self) -> Bundle:
        """This bundle with its weights read: picklable, for processes on other nodes."""
        return replace(self, tensors=self.weights(), path=None)

    def load(self) -> Any:
        """The family's inference object (see the module docstring)."""
        module, _, attr = self.loader.partition(":")
        return getattr(importlib.import_module(module), attr)(self)

    def describe(self) -> dict[str, Any]:
        """The JSON-friendly description (``bundle.json``'s content)."""
        data = asdict(self)
        data.pop("tensors")
        data.pop("path")
        return data


def save_bundle(out_dir: str | Path, bundle: Bundle, weights: dict[str, Any]) -> Path:
    """Writes ``bundle.json`` and ``weights.pt`` into ``out_dir``; returns ``out_dir``.

    Args:
        out_dir: the artifact directory.
        bundle: the description (its ``path`` and ``tensors`` are not saved).
        weights: named state dicts (tensors and plain data only).
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {k: v for k, v in bundle.metrics.items() if isinstance(v, int | float)}
    bundle = replace(bundle, metrics=numbers)
    plain = {
        name: {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        if isinstance(state, dict)
        else state
        for name, state in weights.items()
    }
    torch.save(plain, out / WEIGHTS_FILE)
    text = json.dumps(bundle.describe(), indent=1, sort_keys=True, default=_plain)
    (out / BUNDLE_FILE).write_text(text + "\n")
    return out


def read_bundle(artifact_dir: str | Path) -> Bundle:
    """Reads the bundle of a model artifact (weights are read when first asked for).

    Raises:
        FileNotFoundError: the directory holds no model bundle (the message names it).
        ValueError: the bundle is of an unknown format.
    """
    path = Path(artifact_dir)
    file = path / BUNDLE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {BUNDLE_FILE}; it is not a trained model's artifact")
    data = json.loads(file.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{file}: format {data.get('format')!r}, expected {FORMAT!r}")
    known = {f for f in Bundle.__dataclass_fields__ if f not in ("path", "tensors")}
    return Bundle(**{k: v for k, v in data.items() if k in known}, path=path)


def load_model(artifact_dir: str | Path) -> Any:
    """The inference object of a model artifact, built by the loader its bundle names."""
    return read_bundle(artifact_dir).load()


def build_module(bundle: Bundle, build: Any) -> Any:
    """A family loader's network: ``build(hparams)`` with the bundle's weights loaded, in eval
    mode on the CPU. A compressed model (``meta["compression"]``, written by
    ``model.compress``) is first pruned and quantized again as recorded, so every family loads
    its compressed models with its own loader.
    """
    weights = bundle.weights()["model"]  # read first: a bad file fails before anything
    module = build(bundle.hparams)
    recipe = bundle.meta.get("compression")
    if recipe:
        from components.compression import restore

        return restore(module, recipe, weights, bundle)
    module.load_state_dict(weights)
    module.eval()
    return module


def _plain(value: Any) -> Any:
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
