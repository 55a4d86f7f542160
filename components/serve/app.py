"""The Ray Serve application that serves one model: a deployment of :class:`ModelServer`
replicas, each with a FastAPI ingress whose endpoints follow the model's declared interface
(``interface.py``): ``POST /predict`` (classes, values), ``/act`` (actions), ``/sample``
(images), ``/generate`` (text); and for every model ``GET /healthz``, ``GET /model`` (name,
version, metrics, digest) and the OpenAPI docs at ``/docs``.

How a replica works:

- **Batching.** ``/predict`` and ``/act`` hand each request's validated inputs to a
  ``@serve.batch`` queue; a batch (up to ``max_batch_size`` requests, or what arrived within
  ``batch_wait_ms``) is one forward pass. The handlers are ``async`` only to await that queue:
  the forward pass runs on the replica's compute thread and a large body is parsed on a worker
  thread, so CPU work never blocks the replica's event loop (a CPU-bound ``async def`` would).
  ``/sample`` and ``/generate``, one model call per request, are plain ``def`` handlers, which
  FastAPI runs on its threads.
- **Threads.** Ray sets ``OMP_NUM_THREADS`` to a replica's CPUs; the replica sets torch's
  thread count itself (``threads``, default: its CPUs).
- **Following the champion.** For ``models:/NAME@ALIAS`` a thread checks every
  ``follow_every_s`` where the alias points. When it moved, the new version loads beside the
  old one; then one reference swaps. A batch already running finishes on the version it
  started with, every later batch runs on the new one, and every answer says which version
  gave it (``model.version`` in the body, ``X-Model-Version``): no request waits for a restart
  or fails. A version whose interface differs (other input shape or output type) is refused
  and shown in ``GET /model`` (restart the application to serve it).
- **Bad requests** get a 4xx status and ``{"error": "one line"}``; a batch in which the model
  refuses one request's inputs is answered request by request, so only that request fails.

``build_app`` is the import path a Serve config names (``serve build``, a KubeRay
RayService's ``serveConfigV2``); ``application`` is what ``raypipe serve`` and the
``serve.deploy`` stage run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from components.serve.interface import BadRequest, Completions, Part, Samples
from components.serve.settings import ServeSettings
from components.serve.source import Served, Source

log = logging.getLogger("ray.serve")
#: Bodies up to this size are parsed on the event loop (it takes microseconds); larger ones
#: on a worker thread.
INLINE_BYTES = 32 << 10


def build_app(args: dict[str, Any]):
    """The application a Serve config describes: ``args`` holds ``model`` (a model name, see
    ``source.py``) and any serving settings (``settings.py``)."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ValueError("the application's args need `model` (models:/NAME@ALIAS, ...)")
    return application(model, ServeSettings.model_validate(args))


def application(model: str, settings: ServeSettings):
    """The Serve application serving ``model`` with ``settings`` (not yet running)."""
    options = settings.deployment_options()
    return ModelServer.options(**options).bind(model, settings.model_dump(mode="json"))


class FollowState:
    """What a replica knows of the alias it follows (shown by ``GET /model``)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.checked_at: float | None = None
        self.error: str | None = None
        self.refused: dict[str, str] | None = None
        self.swaps: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        return {
            "every_s": self.every_s,
            "checked_at": self.checked_at,
            "error": self.error,
            "refused": self.refused,
            "swaps": self.swaps[-10:],
        }


@serve.deployment
@serve.ingress()
class ModelServer:
    """One replica: the model, its batch queue, and the thread that follows its alias."""

    def __init__(self, model: str, settings: dict[str, Any]):
        import torch

        self._stop = threading.Event()
        self.settings = ServeSettings.model_validate(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.source = Source(model, self.settings.tracking_uri)
        self.served: Served = self.source.load()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="raypipe-model")
        self._answer.set_max_batch_size(self.settings.max_batch_size)
        self._answer.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        self.follow = FollowState(self.settings.follow_every_s)
        self._follower = None
        if self.source.name.follows:
            self._follower = threading.Thread(
                target=self._follow_alias, name="raypipe-follow", daemon=True
            )
            self._follower.start()

    def __serve_build_asgi_app__(self):
        return make_api(self)

    def check_health(self) -> None:
        """Serve's health check: a replica whose follower died is restarted."""
        if self._follower is not None and not self._follower.is_alive():
            raise RuntimeError("the thread following the model's alias has stopped")

    def __del__(self):
        self._stop.set()

    def describe(self) -> dict[str, Any]:
        """The model this replica serves now (``GET /model``)."""
        info = dict(self.served.info)
        info.pop("folder", None)
        info["follow"] = self.follow.describe() if self.source.name.follows else None
        info["batching"] = {
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_ms": self.settings.batch_wait_ms,
        }
        return info

    # --- answering -------------------------------------------------------------------------

    async def answer(self, part: Part) -> tuple[list[dict[str, Any]], Served]:
        """The results for one request's inputs, from the batch they joined."""
        result = await self._answer(part)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _answer(self, parts: list[Part]) -> list:
        served = self.served  # one version answers the whole batch, even if a swap comes now
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, answer_batch, served, parts)

    # --- following the alias ---------------------------------------------------------------

    def _follow_alias(self) -> None:
        while not self._stop.wait(self.follow.every_s):
            try:
                self._check_alias()
            except Exception as e:  # noqa: BLE001 - keep serving what we have; say why
                self.follow.error = f"{type(e).__name__}: {e}"
                log.warning("following %s: %s", self.source.name.text, self.follow.error)

    def _check_alias(self) -> None:
        version = self.source.current()
        self.follow.checked_at, self.follow.error = time.time(), None
        refused = self.follow.refused and self.follow.refused["version"]
        if version in (self.served.version, refused):
            return
        new = self.source.load(version)
        why = self.served.interface.compatible(new.interface)
        if why is not None:
            self.follow.refused = {"version": version, "reason": why}
            log.warning("not serving %s version %s: %s", self.source.name.name, version, why)
            return
        old, self.served = self.served, new  # the swap: later batches take the new version
        self.follow.refused = None
        self.follow.swaps.append({"from": old.version, "to": version, "at": time.time()})
        log.info("now serving %s version %s (was %s)", self.source.name.name, version, old.version)
        if old.info.get("folder"):
            shutil.rmtree(old.info["folder"], ignore_errors=True)


def answer_batch(served: Served, parts: list[Part]) -> list:
    """One batch on one version: ``(results, served)`` per part; a part whose inputs the model
    refused gets a :class:`BadRequest` instead, and the others are still answered."""
    try:
        inputs = served.interface.inputs.batch(parts, served.model)
        results = served.interface.outputs.results(served.model, inputs)
    except Exception as e:  # noqa: BLE001 - find the request it came from
        if len(parts) > 1:
            return [answer_batch(served, [part])[0] for part in parts]
        if isinstance(e, ValueError | TypeError):
            return [BadRequest(f"the model refused the inputs: {e}")]
        return [e]
    answers, start = [], 0
    for part in parts:
        answers.append((results[start : start + part.count], served))
        start += part.count
    return answers


# --- the HTTP interface --------------------------------------------------------------------


class SampleRequest(BaseModel):
    """``POST /sample``: draw ``n`` images."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(16, ge=1, description="Images to draw.")
    label: StrictInt | StrictStr | None = Field(
        None, description="The class to draw (its name or id); conditional models only."
    )
    seed: int = Field(0, ge=0, description="The same seed draws the same images.")
    format: Literal["png", "json"] = Field(
        "png", description="A PNG grid, or pixels in [0, 1] as (N, C, H, W) arrays."
    )


class GenerateRequest(BaseModel):
    """``POST /generate``: continue a prompt."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    tokens: int = Field(100, ge=1, description="Tokens to generate.")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest only.")
    seed: int = Field(0, ge=0)


def make_api(server: ModelServer) -> FastAPI:
    """The FastAPI application of one replica, with the endpoints its model's interface has."""
    info = server.served.info
    limits = server.settings.limits
    interface = server.served.interface
    api = FastAPI(
        title=f"raypipe: {info['name']}",
        version=str(info["version"]),
        description=f"Serves {info['model']} ({info['kind']}, trained by {info['component']}).",
    )
    api.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    def error(status: int, reason: str) -> JSONResponse:
        # A reason may quote the request (a key, a value): a lone surrogate from a JSON
        # "\ud800" escape is written as that escape, or the body could not be encoded.
        line = " ".join(str(reason).split()).encode("utf-8", "backslashreplace").decode()
        return JSONResponse({"error": line}, status_code=status)

    @api.exception_handler(BadRequest)
    async def _bad_request(_request, e: BadRequest):
        return error(e.status, e.reason)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg')}")

    @api.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return error(e.status_code, e.detail)

    @api.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        log.exception("request failed")
        return error(500, f"internal error ({type(e).__name__}); the server goes on serving")

    def stamped(body: dict[str, Any], served: Served) -> JSONResponse:
        body["model"] = {"name": served.info["name"], "version": served.version}
        return JSONResponse(body, headers={"X-Model-Version": str(served.version)})

    @api.get("/healthz", summary="Whether the replica serves (and which version).")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": server.served.version}

    @api.get("/model", summary="The model served: name, version, metrics, digest, interface.")
    def model() -> dict[str, Any]:
        return server.describe()

    if interface.outputs.batched:
        inputs_doc = {
            "type": "object",
            "properties": {
                "inputs": {
                    "type": "array",
                    "items": interface.inputs.item_schema(),
                    "maxItems": limits.max_items,
                }
            },
            "required": ["inputs"],
        }
        content: dict[str, Any] = {"application/json": {"schema": inputs_doc}}
        if interface.inputs.type == "image":
            binary = {"schema": {"type": "string", "format": "binary"}}
            content.update({"image/png": binary, "image/jpeg": binary})

        async def predict(request: Request) -> Response:
            body = await request.body()
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            decode = server.served.interface.inputs  # the input spec stays across swaps
            if kind in ("", "application/json"):
                part = await _cpu(len(body), _from_json, decode, body, limits)
            else:
                part = await _cpu(len(body), decode.from_bytes, body, kind, limits)
            results, served = await server.answer(part)
            return stamped({"predictions": results}, served)

        api.add_api_route(
            interface.endpoint,
            predict,
            methods=["POST"],
            summary=f"{interface.outputs.type} of each input ({interface.inputs.type})",
            openapi_extra={"requestBody": {"required": True, "content": content}},
        )

    if isinstance(interface.outputs, Samples):

        @api.post("/sample", summary="Draw images: a PNG grid or arrays.")
        def sample(request: SampleRequest) -> Response:
            if request.n > limits.max_samples:
                raise BadRequest(f"n = {request.n}: at most {limits.max_samples} per request")
            served = server.served
            classes = int(served.model.bundle.input.get("num_classes") or 0)
            label = served.interface.outputs.label_id(request.label, classes)
            if request.format == "json":
                pixels = served.model.sample(request.n, label, request.seed)
                return stamped({"images": pixels.tolist()}, served)
            with tempfile.TemporaryDirectory(prefix="raypipe-sample-") as tmp:
                out = Path(tmp) / "grid.png"
                png = Path(served.model.sample_grid(request.n, label, out, request.seed))
                data = png.read_bytes()
            version = {"X-Model-Version": str(served.version)}
            return Response(data, media_type="image/png", headers=version)

    if isinstance(interface.outputs, Completions):

        @api.post("/generate", summary="Continue a prompt.")
        def generate(request: GenerateRequest) -> Response:
            if request.tokens > limits.max_tokens:
                raise BadRequest(f"tokens = {request.tokens}: at most {limits.max_tokens}")
            if len(request.prompt) > limits.max_text_chars:
                raise BadRequest(
                    f"the prompt has {len(request.prompt)} characters, at most "
                    f"{limits.max_text_chars}"
                )
            served = server.served
            try:
                text = served.model.generate(
                    request.prompt,
                    request.tokens,
                    temperature=request.temperature,
                    top_k=request.top_k,
                    seed=request.seed,
                )
            except ValueError as e:  # the family's word for input it cannot take
                raise BadRequest(f"the model refused the prompt: {e}") from None
            return stamped({"completion": text}, served)

    return api


async def _cpu(size: int, fn, *args):
    """``fn(*args)``: inline for a small body, else on a worker thread."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def _from_json(inputs, body: bytes, limits) -> Part:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}", status=400) from None
    if not isinstance(value, dict) or "inputs" not in value:
        raise BadRequest('the body must be a JSON object {"inputs": [...]}', status=400)
    extra = sorted(set(value) - {"inputs"})
    if extra:
        raise BadRequest(f"unknown field {extra[0]!r}; the body holds only `inputs`")
    return inputs.from_json(value["inputs"], limits)


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413, by its Content-Length or, for a
    streamed body, as soon as it grows past the limit, before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the body is over the limit of {self.max_bytes} bytes"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, reason = (413, too_big) if length.isdigit() else (400, "bad Content-Length")
            return await JSONResponse({"error": reason}, status_code=status)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_big)
            return message

        return await self.app(scope, limited, send)
