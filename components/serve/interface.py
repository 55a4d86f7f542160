"""A model's interface: how a request becomes the model's input and its output becomes the
answer, chosen by the input and output types its bundle declares (``components/bundle.py``).
The HTTP application (``app.py``) and the MLflow model (``pyfunc.py``) both use it, so both
validate alike and answer alike, and neither knows a model family.

Inputs, by the bundle's ``input`` type (JSON ``{"inputs": [...]}``, one entry per item):

- ``image``: arrays of the input ``shape`` [C, H, W], normalized as the model takes them (the
  bundle's ``normalization``); or the bytes of one PNG/JPEG image, which the server scales,
  resizes and normalizes itself;
- ``vector``: arrays of ``shape`` [D] (within ``low``/``high`` where the spec bounds them);
- ``text``: strings;
- ``table``: rows, ``{column: raw value}`` for every numeric and categorical column.

Outputs, by the bundle's ``output`` type, each with its endpoint:

- ``classes`` -> ``POST /predict``: ``{"label", "label_id", "probabilities"}`` per input;
- ``value`` -> ``POST /predict``: ``{"value"}`` per input;
- ``action`` -> ``POST /act``: ``{"action"}`` per observation;
- ``image`` -> ``POST /sample``: ``n`` images (a PNG grid or arrays in [0, 1]);
- ``tokens`` -> ``POST /generate``: a completion of a prompt.

A new family whose model takes and gives these types is served with nothing added here.
Anything a request gets wrong raises :class:`BadRequest`: an HTTP status (4xx) and one line.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from components.serve.settings import Limits
from pipelines.guards import not_unicode


class BadRequest(ValueError):
    """A request the model cannot take: a 4xx status and a one-line reason."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason = " ".join(reason.split())  # one line, whatever the cause held
        self.status = status


@dataclass(frozen=True)
class Part:
    """One request's validated inputs, waiting in a batch.

    Attributes:
        data: the items (an array with the items along axis 0, or a list).
        count: how many items.
        unit_pixels: images on the [0, 1] pixel scale (decoded from PNG/JPEG) that the model's
            own normalization is applied to when the batch runs, so an image is normalized
            with the statistics of the version that answers it.
    """

    data: Any
    count: int
    unit_pixels: bool = False


def _items(value: Any, limits: Limits, what: str = "inputs") -> list:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list (one entry per item), got {_kind(value)}")
    if not value:
        raise BadRequest(f"{what} is empty")
    if len(value) > limits.max_items:
        raise BadRequest(f"{what}: {len(value)} items, at most {limits.max_items} per request")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _numbers(value: list, shape: list[int], what: str) -> np.ndarray:
    """The items as a float32 array of (N, *shape), refusing what is not finite numbers."""
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses ragged nesting
        raise BadRequest(
            f"{what}: every item must be an array of shape {list(shape)} (the items are ragged)"
        ) from None
    if array.dtype.kind not in "iuf":
        found = {"U": "strings", "b": "booleans", "O": "nulls or mixed values"}.get(
            array.dtype.kind, str(array.dtype)
        )
        raise BadRequest(f"{what}: numbers expected, got {found}")
    if list(array.shape[1:]) != list(shape):
        raise BadRequest(
            f"{what}: each item must have shape {list(shape)}, got {list(array.shape[1:])}"
        )
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise BadRequest(f"{what}: NaN or infinite values (or beyond float32)")
    return array


class Inputs:
    """What a model takes, by the bundle's ``input`` type: one subclass per type."""

    type: ClassVar[str]

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def from_json(self, value: Any, limits: Limits) -> Part:
        """The validated items of a JSON request's ``inputs``."""
        raise NotImplementedError

    def from_bytes(self, data: bytes, content_type: str, limits: Limits) -> Part:
        """The item a raw (non-JSON) request body holds; only images have one."""
        raise BadRequest(
            f'a model of {self.type} inputs takes JSON ({{"inputs": [...]}}), '
            f"not {content_type or 'a body without a content type'}",
            status=415,
        )

    def batch(self, parts: list[Part], model: Any) -> Any:
        """The model's input for the parts of one batch, in order."""
        return [item for part in parts for item in part.data]

    def example(self) -> Any:
        """An input of one item, in the form the MLflow model takes (its input example)."""
        raise NotImplementedError

    def from_mlflow(self, model_input: Any) -> Any:
        """The model's input from what an MLflow model was given (the signature's form)."""
        return model_input

    def item_schema(self) -> dict[str, Any]:
        """The JSON schema of one item (for the OpenAPI docs)."""
        raise NotImplementedError

    def same_as(self, other: Inputs) -> bool:
        """Whether a model taking ``other`` can answer the same requests."""
        return type(self) is type(other) and self.spec.get("shape") == other.spec.get("shape")


class ImageInputs(Inputs):
    type = "image"
    content_types = ("image/png", "image/jpeg", "image/", "application/octet-stream")

    @property
    def shape(self) -> list[int]:
        return list(self.spec["shape"])

    def from_json(self, value: Any, limits: Limits) -> Part:
        items = _items(value, limits)
        return Part(_numbers(items, self.shape, "inputs"), len(items))

    def from_bytes(self, data: bytes, content_type: str, limits: Limits) -> Part:
        if not content_type.startswith(self.content_types):
            return super().from_bytes(data, content_type, limits)
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.shape
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_image_pixels:
                raise BadRequest(
                    f"the image is {image.width}x{image.height}, over the limit of "
                    f"{limits.max_image_pixels} pixels",
                    status=413,
                )
            image = image.convert("L" if c == 1 else "RGB")
            if image.size != (w, h):
                image = image.resize((w, h), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        except BadRequest:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            why = str(e).split(" <_io.")[0]  # not the buffer's address
            raise BadRequest(
                f"the body is not an image that decodes (PNG, JPEG): {why}", 400
            ) from None
        pixels = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
        return Part(pixels[None], 1, unit_pixels=True)

    def batch(self, parts: list[Part], model: Any) -> np.ndarray:
        stats = self.spec.get("normalization") or {}
        arrays = [
            normalize(p.data, stats) if p.unit_pixels else p.data
            for p in parts
            # a version's own statistics: see Part.unit_pixels
        ]
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    def example(self) -> np.ndarray:
        return np.zeros((1, *self.shape), np.float32)

    def from_mlflow(self, model_input: Any) -> np.ndarray:
        return np.asarray(model_input, np.float32)

    def item_schema(self) -> dict[str, Any]:
        return _nested_array(self.shape)


def normalize(pixels: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Pixels on the [0, 1] scale (N, C, H, W), normalized as the model's data was:
    ``(x - shift) / divisor`` per channel (``components/data/normalization.py`` wrote them)."""
    if not stats:
        return pixels
    shape = (1, -1, 1, 1)
    shift = np.asarray(stats["shift"], np.float32).reshape(shape)
    divisor = np.asarray(stats["divisor"], np.float32).reshape(shape)
    return ((pixels - shift) / divisor).astype(np.float32)


class VectorInputs(Inputs):
    type = "vector"

    def from_json(self, value: Any, limits: Limits) -> Part:
        items = _items(value, limits)
        array = _numbers(items, list(self.spec["shape"]), "inputs")
        low, high = self.spec.get("low"), self.spec.get("high")
        if low is not None and high is not None:
            outside = (array < np.asarray(low, np.float32)) | (array > np.asarray(high, np.float32))
            if outside.any():
                row, col = (int(i) for i in np.argwhere(outside)[0])
                raise BadRequest(
                    f"inputs[{row}][{col}] = {array[row, col]:g} is outside "
                    f"[{low[col]:g}, {high[col]:g}]"
                )
        return Part(array, len(items))

    def batch(self, parts: list[Part], model: Any) -> np.ndarray:
        return np.concatenate([p.data for p in parts])

    def example(self) -> np.ndarray:
        low, high = self.spec.get("low"), self.spec.get("high")
        if low is not None and high is not None:
            return ((np.asarray(low) + np.asarray(high)) / 2).astype(np.float32)[None]
        return np.zeros((1, *self.spec["shape"]), np.float32)

    def from_mlflow(self, model_input: Any) -> np.ndarray:
        return np.asarray(model_input, np.float32)

    def item_schema(self) -> dict[str, Any]:
        return _nested_array(list(self.spec["shape"]))


class TextInputs(Inputs):
    type = "text"

    def from_json(self, value: Any, limits: Limits) -> Part:
        items = _items(value, limits)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise BadRequest(f"inputs[{i}]: a string expected, got {_kind(text)}")
            if len(text) > limits.max_text_chars:
                raise BadRequest(
                    f"inputs[{i}]: {len(text)} characters, at most {limits.max_text_chars}"
                )
            if problem := not_unicode(text):  # before it can join (and fail) a batch
                raise BadRequest(f"inputs[{i}]: {problem}")
        return Part(list(items), len(items))

    def example(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"text": ["an example"]})

    def from_mlflow(self, model_input: Any) -> list[str]:
        return [str(t) for t in model_input["text"]]

    def item_schema(self) -> dict[str, Any]:
        return {"type": "string"}

    def same_as(self, other: Inputs) -> bool:
        return type(self) is type(other)


class TableInputs(Inputs):
    type = "table"

    @property
    def numeric(self) -> list[str]:
        return list(self.spec.get("columns") or [])

    @property
    def categorical(self) -> list[str]:
        return list(self.spec.get("categorical") or [])

    def from_json(self, value: Any, limits: Limits) -> Part:
        items = _items(value, limits)
        known = set(self.numeric) | set(self.categorical)
        rows = []
        for i, row in enumerate(items):
            if not isinstance(row, dict):
                raise BadRequest(f"inputs[{i}]: a row {{column: value}} expected, got {_kind(row)}")
            unknown = sorted(set(row) - known)
            if unknown:
                raise BadRequest(
                    f"inputs[{i}]: unknown column {unknown[0]!r}; the columns are "
                    + ", ".join(sorted(known))
                )
            for column in self.numeric:
                if column not in row:
                    raise BadRequest(f"inputs[{i}]: no value for column {column!r}")
                v = row[column]
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise BadRequest(f"inputs[{i}].{column}: a number expected, got {_kind(v)}")
                if not math.isfinite(v):
                    raise BadRequest(f"inputs[{i}].{column}: NaN or infinite")
            for column in self.categorical:
                if column not in row:
                    raise BadRequest(f"inputs[{i}]: no value for column {column!r}")
                if not isinstance(row[column], str | int) or isinstance(row[column], bool):
                    raise BadRequest(
                        f"inputs[{i}].{column}: a category (string) expected, got "
                        f"{_kind(row[column])}"
                    )
            rows.append(dict(row))
        return Part(rows, len(rows))

    def example(self) -> Any:
        import pandas as pd

        categories = self.spec.get("categories") or {}
        row: dict[str, Any] = {c: 0.0 for c in self.numeric}
        row.update({c: str((categories.get(c) or [""])[0]) for c in self.categorical})
        return pd.DataFrame([row])

    def from_mlflow(self, model_input: Any) -> list[dict[str, Any]]:
        return model_input.to_dict(orient="records")

    def item_schema(self) -> dict[str, Any]:
        properties = {c: {"type": "number"} for c in self.numeric}
        properties.update({c: {"type": "string"} for c in self.categorical})
        return {"type": "object", "properties": properties, "required": list(properties)}

    def same_as(self, other: Inputs) -> bool:
        return (
            isinstance(other, TableInputs)
            and self.numeric == other.numeric
            and self.categorical == other.categorical
        )


def _nested_array(shape: list[int]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for size in reversed(shape):
        schema = {"type": "array", "items": schema, "minItems": size, "maxItems": size}
    return schema


INPUTS: dict[str, type[Inputs]] = {
    cls.type: cls for cls in (ImageInputs, VectorInputs, TextInputs, TableInputs)
}


# --- outputs --------------------------------------------------------------------------------


class Outputs:
    """What a model gives, by the bundle's ``output`` type, and the endpoint that gives it.

    ``batched`` outputs answer many requests with one call of the model (dynamic batching):
    :meth:`results` maps a batch of inputs to one result per item.
    """

    type: ClassVar[str]
    endpoint: ClassVar[str]
    batched: ClassVar[bool] = True
    #: The inference object's method the endpoint calls (``bundle.py`` fixes it by type).
    method: ClassVar[str]

    def __init__(self, spec: dict[str, Any], labels: list[str] | None):
        self.spec = spec
        self.labels = labels

    def results(self, model: Any, inputs: Any) -> list[dict[str, Any]]:
        """One JSON-ready result per input item."""
        raise NotImplementedError

    def same_as(self, other: Outputs) -> bool:
        return type(self) is type(other)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class Classes(Outputs):
    type, endpoint, method = "classes", "/predict", "probabilities"

    def results(self, model: Any, inputs: Any) -> list[dict[str, Any]]:
        probabilities = _numpy(model.probabilities(inputs)).astype(np.float64)
        ids = probabilities.argmax(1)
        return [
            {"label": self.label(int(i)), "label_id": int(i), "probabilities": p.tolist()}
            for i, p in zip(ids, probabilities, strict=True)
        ]

    def label(self, i: int) -> str:
        return str(self.labels[i]) if self.labels else str(i)


class Values(Outputs):
    type, endpoint, method = "value", "/predict", "predict"

    def results(self, model: Any, inputs: Any) -> list[dict[str, Any]]:
        values = _numpy(model.predict(inputs)).astype(np.float64)
        values = values.reshape(len(values), -1)
        return [{"value": float(v[0]) if len(v) == 1 else v.tolist()} for v in values]


class Actions(Outputs):
    type, endpoint, method = "action", "/act", "act"

    def results(self, model: Any, inputs: Any) -> list[dict[str, Any]]:
        actions = _numpy(model.act(inputs)).astype(np.float64)
        return [{"action": a.reshape(-1).tolist()} for a in actions]


class Samples(Outputs):
    """Generators: ``sample(n, label, seed)``; each request draws its own images."""

    type, endpoint, method, batched = "image", "/sample", "sample", False

    def label_id(self, label: int | str | None, num_classes: int) -> int | None:
        """The class id of a requested label (a name or an id), or None.

        Raises:
            BadRequest: a label the model does not know, or any label for a model without.
        """
        if label is None:
            return None
        if not num_classes:
            raise BadRequest(f"unknown label {label!r}: this model draws no classes")
        names = [str(n) for n in self.labels or range(num_classes)]
        if isinstance(label, str) and label in names:
            return names.index(label)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < num_classes:
            return label
        raise BadRequest(f"unknown label {label!r}; the labels are {', '.join(names)}")

    def same_as(self, other: Outputs) -> bool:
        return isinstance(other, Samples) and self.spec.get("shape") == other.spec.get("shape")


class Completions(Outputs):
    """Language models: ``generate(prompt, tokens, temperature, top_k, seed)``."""

    type, endpoint, method, batched = "tokens", "/generate", "generate", False


OUTPUTS: dict[str, type[Outputs]] = {
    cls.type: cls for cls in (Classes, Values, Actions, Samples, Completions)
}


@dataclass(frozen=True)
class Interface:
    """A model's inputs and outputs, from its bundle.

    Attributes:
        inputs: what its requests hold (None for generators, whose requests hold settings).
        outputs: what it gives, and so its endpoint.
    """

    inputs: Inputs | None
    outputs: Outputs

    @property
    def endpoint(self) -> str:
        return self.outputs.endpoint

    def compatible(self, other: Interface) -> str | None:
        """Why a model with ``other`` cannot replace this one behind the same endpoints
        (None: it can)."""
        if not self.outputs.same_as(other.outputs):
            return f"its output is {other.outputs.spec}, not {self.outputs.spec}"
        if (self.inputs is None) != (other.inputs is None) or (
            self.inputs is not None and not self.inputs.same_as(other.inputs)
        ):
            mine = None if self.inputs is None else self.inputs.spec
            theirs = None if other.inputs is None else other.inputs.spec
            return f"its input is {_short(theirs)}, not {_short(mine)}"
        return None


def _short(spec: dict[str, Any] | None) -> str:
    if spec is None:
        return "none"
    return str({k: v for k, v in spec.items() if k != "normalization"})


def interface_of(bundle: Any) -> Interface:
    """The interface a bundle declares.

    Raises:
        ValueError: an input or output type serving does not know (the message lists those
            it does).
    """
    out_type = bundle.output.get("type")
    if out_type not in OUTPUTS:
        raise ValueError(
            f"{bundle.component}: a model giving {out_type!r} cannot be served; served "
            f"outputs: {', '.join(OUTPUTS)}"
        )
    outputs = OUTPUTS[out_type](bundle.output, bundle.labels)
    if not outputs.batched:
        return Interface(None, outputs)
    in_type = bundle.input.get("type")
    if in_type not in INPUTS:
        raise ValueError(
            f"{bundle.component}: a model taking {in_type!r} cannot be served; served "
            f"inputs: {', '.join(INPUTS)}"
        )
    return Interface(INPUTS[in_type](bundle.input), outputs)
