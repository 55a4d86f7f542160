"""Where a served model comes from, and which version of it is the one to serve now.

A model is named by:

- ``models:/NAME@ALIAS``: the version the alias points at, in the MLflow registry; a server
  follows the alias (``ALIAS`` is ``champion`` after a ``tune.evaluate`` gate);
- ``models:/NAME/VERSION``: one registered version;
- a model artifact's folder (what ``raypipe serve RUN_ID/STAGE`` resolves to): the folder must
  be readable where the replicas run.

Registered versions load through MLflow (``mlflow.pyfunc.load_model`` of the version's MLflow
model, whose ``python_model`` calls ``bundle.load_model``); a folder loads with
``bundle.load_model`` directly. Either way the model's family is never imported here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.serve.interface import Interface, interface_of

MODELS = "models:/"


@dataclass(frozen=True)
class ModelName:
    """A parsed model name (see the module docstring).

    Attributes:
        text: as given.
        name: the registered model (``models:/`` names).
        alias: the alias a server follows (``models:/NAME@ALIAS``).
        version: a fixed registered version (``models:/NAME/VERSION``).
        path: a model artifact's folder.
    """

    text: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    path: str | None = None

    @property
    def follows(self) -> bool:
        """Whether a server moves with the alias."""
        return self.alias is not None


def parse_model(text: str) -> ModelName:
    """Parses ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a folder path.

    Raises:
        ValueError: a ``models:/`` name of another form.
    """
    if not text.startswith(MODELS):
        return ModelName(text, path=text)
    rest = text[len(MODELS) :]
    if m := re.fullmatch(r"([^/@]+)@([\w.-]+)", rest):
        return ModelName(text, name=m[1], alias=m[2])
    if m := re.fullmatch(r"([^/@]+)/(\d+)", rest):
        return ModelName(text, name=m[1], version=m[2])
    raise ValueError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


@dataclass
class Served:
    """A loaded model, ready to answer.

    Attributes:
        model: the family's inference object (``bundle.load_model``).
        interface: its inputs and outputs (``interface.py``).
        info: what ``GET /model`` shows of it: name, version, metrics, digest...
    """

    model: Any
    interface: Interface
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str | None:
        return self.info.get("version")


class Source:
    """Finds and loads the model a server serves.

    Args:
        model: the model's name (see the module docstring).
        tracking_uri: the MLflow tracking and registry URI (``models:/`` names).
    """

    def __init__(self, model: str, tracking_uri: str | None = None):
        self.name = parse_model(model)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if self.name.path is None and not self.tracking_uri:
            raise ValueError(f"{model}: no MLflow tracking URI to find it in")
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self.tracking_uri, self.tracking_uri)
        return self._client

    def current(self) -> str | None:
        """The registered version to serve now (None for a folder).

        Raises:
            LookupError: no such registered model, alias or version (the message says which).
        """
        from mlflow.exceptions import MlflowException

        n = self.name
        if n.path is not None:
            return None
        try:
            if n.alias is not None:
                return str(self.client.get_model_version_by_alias(n.name, n.alias).version)
            return str(self.client.get_model_version(n.name, n.version).version)
        except MlflowException as e:
            where = f"@{n.alias}" if n.alias else f"version {n.version}"
            raise LookupError(
                f"{n.text}: the registry at {self.tracking_uri} has no {n.name} {where} "
                f"({e.error_code})"
            ) from None

    def load(self, version: str | None = None) -> Served:
        """Loads a version (a folder: the folder's model)."""
        if self.name.path is not None:
            return self._load_folder(Path(self.name.path))
        return self._load_version(version or self.current())

    def _load_folder(self, path: Path) -> Served:
        from components.bundle import load_model

        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: no such model folder on this node; a cluster serves registered "
                "models (models:/NAME@ALIAS) or folders every node can read"
            )
        model = load_model(path)
        manifest = _read_json(path / "manifest.json")
        bundle = model.bundle
        numbers = {
            k: v
            for k, v in (manifest.get("metrics") or bundle.metrics).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        facts = {
            "name": manifest.get("stage") or bundle.component,
            "version": manifest.get("digest", "")[:12] or None,
            "digest": manifest.get("digest"),
            "metrics": numbers,
            "run_id": manifest.get("run_id"),
            "stage": manifest.get("stage"),
            "path": str(path),
        }
        return _served(model, self.name, facts)

    def _load_version(self, version: str) -> Served:
        import mlflow

        from components.serve.pyfunc import raypipe_facts

        n = self.name
        # Kept while the version is served (a family may read its files lazily); the server
        # removes it when it swaps to another version.
        folder = tempfile.mkdtemp(prefix=f"raypipe-serve-{n.name}-{version}-")
        try:
            # Where the version's files are, asked of our client: a `models:/` URI would be
            # resolved through MLflow's global registry URI instead.
            location = self.client.get_model_version_download_uri(n.name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=folder)
            loaded = mlflow.pyfunc.load_model(local)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        facts = raypipe_facts(loaded)
        registered = self.client.get_model_version(n.name, version)
        facts.update(
            name=n.name,
            version=str(version),
            registered_at=registered.creation_timestamp / 1000,
            model_id=getattr(registered, "model_id", None),
            folder=folder,
        )
        return _served(loaded.unwrap_python_model().model, n, facts)


def _served(model: Any, name: ModelName, facts: dict[str, Any]) -> Served:
    bundle = model.bundle
    interface = interface_of(bundle)
    info = {
        "name": facts.pop("name"),
        "version": facts.pop("version"),
        "model": name.text,
        "alias": name.alias,
        "follows": name.follows,
        "endpoint": interface.endpoint,
        "component": bundle.component,
        "kind": bundle.kind,
        "input": bundle.input,
        "output": bundle.output,
        "labels": bundle.labels,
        "loaded_at": time.time(),
        **facts,
    }
    return Served(model, interface, info)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
