"""The MLflow model of a raypipe model: a pyfunc whose artifacts are the model's bundle folder
and whose ``python_model`` loads it with ``components.bundle.load_model``. The bundle stays the
source of truth; this wrapper makes every MLflow tool work on a registered version:
``mlflow.pyfunc.load_model("models:/NAME@champion")``, ``mlflow models serve`` (in raypipe's
environment: ``--env-manager local``), the registry UI.

What ``predict`` takes and gives follows the bundle's input and output types
(``interface.py``), as the HTTP endpoints do:

- ``image``/``vector`` inputs: a float32 tensor (N, ...); ``text``: a ``text`` column;
  ``table``: one column per input column;
- ``classes``/``value``/``action`` outputs: a DataFrame with the endpoint's fields
  (``label``, ``label_id``, ``probabilities``; ``value``; ``action``);
- generators: rows of ``label`` (conditional models) and ``seed``, one image (C, H, W) each;
- language models: a ``prompt`` column, params ``tokens``, ``temperature``, ``top_k`` (0:
  none) and ``seed``; a ``completion`` column.

``tune.evaluate`` logs one (:func:`log_model`) for each candidate it registers.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from components.serve.interface import Completions, Interface, Samples, interface_of

ARTIFACT = "bundle"  # the key of the bundle folder among the pyfunc model's artifacts
METADATA_KEY = "raypipe"  # where the MLmodel file's metadata keeps what raypipe knows
FALLBACK_EXPERIMENT = "raypipe-registered-models"
#: Packages every family's inference imports; the model records the versions installed here.
#: Families import raypipe's own code too: load the model where raypipe is installed
#: (``mlflow models serve --env-manager local``).
REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml")
GENERATE_DEFAULTS = {"tokens": 100, "temperature": 1.0, "top_k": 0, "seed": 0}

log = logging.getLogger(__name__)


class BundleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc ``python_model``: loads the bundle in the model's artifacts."""

    def load_context(self, context) -> None:
        from components.bundle import load_model

        self.model = load_model(context.artifacts[ARTIFACT])
        self.interface = interface_of(self.model.bundle)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return predict(self.model, self.interface, model_input, params)


def predict(model: Any, interface: Interface, model_input: Any, params: dict | None = None):
    """What the MLflow model answers (see the module docstring)."""
    import pandas as pd

    outputs = interface.outputs
    if isinstance(outputs, Samples):
        rows = model_input.to_dict(orient="records")
        images = [
            model.sample(1, _label(row.get("label")), int(row.get("seed", 0)))[0] for row in rows
        ]
        return np.stack(images).astype(np.float32)
    if isinstance(outputs, Completions):
        p = {**GENERATE_DEFAULTS, **(params or {})}
        completions = [
            model.generate(
                str(prompt),
                int(p["tokens"]),
                temperature=float(p["temperature"]),
                top_k=int(p["top_k"]) or None,
                seed=int(p["seed"]),
            )
            for prompt in model_input["prompt"]
        ]
        return pd.DataFrame({"completion": completions})
    return pd.DataFrame(outputs.results(model, interface.inputs.from_mlflow(model_input)))


def _label(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or int(value) < 0:
        return None
    return int(value)


def example_of(model: Any, interface: Interface) -> tuple[Any, dict[str, Any] | None]:
    """An input example of one item for the model, and the params it takes (if any)."""
    import pandas as pd

    outputs = interface.outputs
    if isinstance(outputs, Samples):
        conditional = bool(model.bundle.input.get("num_classes"))
        return pd.DataFrame({"label": [0], "seed": [0]} if conditional else {"seed": [0]}), None
    if isinstance(outputs, Completions):
        return pd.DataFrame({"prompt": [""]}), dict(GENERATE_DEFAULTS)
    return interface.inputs.example(), None


def signature_of(model: Any, interface: Interface):
    """The model's MLflow signature and input example, from its interface: the output schema
    is inferred from what the model answers to the example."""
    from mlflow.models import infer_signature

    example, params = example_of(model, interface)
    try:
        output = predict(model, interface, example, params)
    except Exception as e:  # noqa: BLE001 - a signature without outputs still serves
        log.warning("%s: no output schema (the example failed: %s)", model.bundle.component, e)
        output = None
    return infer_signature(example, output, params), example


def requirements() -> list[str]:
    """The pip requirements recorded with the model (versions installed here)."""
    found = []
    for name in ("mlflow", *REQUIREMENTS):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(f"{name}=={version}")
    if any("+cpu" in r for r in found):  # a CPU build of torch comes from PyTorch's index
        found.insert(0, "--extra-index-url https://download.pytorch.org/whl/cpu")
    return found


@dataclass(frozen=True)
class LoggedModel:
    """A model logged to MLflow (:func:`log_model`).

    Attributes:
        model_id: the logged model's id.
        uri: ``models:/<model_id>``, the registered version's source.
        run_id: the MLflow run it belongs to (the pipeline run's), if tracking found it.
    """

    model_id: str
    uri: str
    run_id: str | None


def log_model(
    client,
    artifact_dir: str | Path,
    name: str,
    facts: dict[str, Any],
    tracking_uri: str | None,
) -> LoggedModel:
    """Logs a model artifact (a bundle folder) as an MLflow pyfunc model.

    It goes into the MLflow run of the pipeline run named by ``facts["raypipe.run_id"]`` (its
    experiment), or, when tracking did not record one, into the experiment
    ``raypipe-registered-models``.

    Args:
        client: an ``MlflowClient`` of the tracking store.
        artifact_dir: the model's artifact folder (``bundle.json``, ``weights.pt``...).
        name: the logged model's name (the registered model's).
        facts: what raypipe knows of it (metrics, run id, stage, digest): kept in the MLmodel
            file's metadata (``raypipe``) and as the logged model's tags.
        tracking_uri: the tracking URI (where a fallback experiment keeps its artifacts).
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    from components.bundle import load_model

    artifact_dir = Path(artifact_dir)
    model = load_model(artifact_dir)
    interface = interface_of(model.bundle)
    signature, example = signature_of(model, interface)
    experiment_id, run_id = _experiment_of(client, facts.get("raypipe.run_id"), tracking_uri)
    bundle = model.bundle
    info = {
        "component": bundle.component,
        "kind": bundle.kind,
        "endpoint": interface.endpoint,
        **{k.removeprefix("raypipe."): v for k, v in facts.items() if k != "metrics"},
        "metrics": facts.get("metrics", {}),
    }
    tags = {f"raypipe.{k}": str(v) for k, v in info.items() if k != "metrics"}
    logged = client.create_logged_model(
        experiment_id,
        name=_model_name(name),
        source_run_id=run_id,
        tags=tags,
        model_type=bundle.kind,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="raypipe-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(Path(__file__).with_name("mlflow_code.py")),
                artifacts={ARTIFACT: str(artifact_dir)},
                signature=signature,
                input_example=example,
                pip_requirements=requirements(),
                metadata={METADATA_KEY: info},
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                ),
            )
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return LoggedModel(logged.model_id, f"models:/{logged.model_id}", run_id)


def register(
    client,
    name: str,
    artifact_dir: str | Path,
    facts: dict[str, Any],
    tracking_uri: str | None,
    **version: Any,
):
    """Logs a model artifact as an MLflow model (:func:`log_model`) and registers it as a new
    version of ``name``; returns the ``ModelVersion``.

    Args:
        version: more arguments of ``create_model_version`` (``tags``, ``description``).
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    logged = log_model(client, artifact_dir, name, facts, tracking_uri)
    # MLflow's registry looks the logged model up through the global tracking URI, not the
    # client's (a TODO in its SQLAlchemy store): point it at ours for the call.
    with _use_tracking_uri(tracking_uri or mlflow.get_tracking_uri()):
        return client.create_model_version(
            name, source=logged.uri, run_id=logged.run_id, model_id=logged.model_id, **version
        )


def _model_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "-", name)


def _experiment_of(client, run_id: str | None, tracking_uri: str | None) -> tuple[str, str | None]:
    """The experiment and MLflow run of a raypipe run (the driver's tracking made them), else
    the fallback experiment (its artifacts beside a SQLite database, as the pipelines')."""
    if run_id:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            experiments,
            filter_string=f"tags.`raypipe.run_id` = '{run_id}' and tags.`raypipe.kind` = 'run'",
            max_results=1,
        )
        if runs:
            return runs[0].info.experiment_id, runs[0].info.run_id
    found = client.get_experiment_by_name(FALLBACK_EXPERIMENT)
    if found is not None:
        return found.experiment_id, None
    location = None
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        location = (db.parent / "mlflow-artifacts").resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(FALLBACK_EXPERIMENT, artifact_location=location), None
    except MlflowException:  # made meanwhile by a concurrent gate
        return client.get_experiment_by_name(FALLBACK_EXPERIMENT).experiment_id, None


def raypipe_facts(pyfunc_model: Any) -> dict[str, Any]:
    """What raypipe recorded in a loaded MLflow model's metadata (``raypipe``)."""
    return dict((pyfunc_model.metadata.metadata or {}).get(METADATA_KEY) or {})
