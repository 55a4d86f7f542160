"""The settings of a served model: one typed object for `raypipe serve`'s flags, its YAML file
(``--config``), the ``serve.deploy`` stage's ``with:`` block and a RayService's ``args``.
Every default of serving lives here.

>>> settings = ServeSettings.model_validate(yaml.safe_load(open("serve.yaml")))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from components.api import StrictModel

#: The fewest requests a replica takes at once by default. When every replica is full, Serve's
#: router does not queue a request: it retries it with a backoff growing to 0.5 s, so clients
#: beyond replicas x max_ongoing_requests collapse throughput (unbatched digits, 32 clients:
#: 10.8 requests/s and a 5.5 s p99 with 2 a replica, 223/s with 64). A replica's own queue is
#: first in, first out.
MIN_ONGOING = 64


class Limits(StrictModel):
    """What one request may ask for; beyond it the request gets a 4xx, never a 500.

    Attributes:
        max_body_bytes: the largest request body (HTTP 413 beyond it).
        max_items: inputs in one ``/predict`` or ``/act`` request.
        max_image_pixels: width x height of an uploaded image before it is decoded.
        max_text_chars: characters of one text, and of a ``/generate`` prompt.
        max_samples: images one ``/sample`` request draws.
        max_tokens: tokens one ``/generate`` request produces.
    """

    max_body_bytes: int = Field(4 << 20, ge=1024)
    max_items: int = Field(256, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_samples: int = Field(64, ge=1)
    max_tokens: int = Field(1000, ge=1)


class Autoscaling(StrictModel):
    """Replicas that follow the load (Ray Serve's autoscaler).

    Attributes:
        min_replicas: replicas kept when idle.
        max_replicas: the most replicas it starts.
        target_ongoing_requests: requests in flight per replica that it scales towards (a
            replica batches up to ``max_batch_size`` of them into one forward pass).
        upscale_delay_s: how long the load must stay high before a replica is added.
        downscale_delay_s: how long it must stay low before one is removed.
    """

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}"
            )
        return self


class ServeSettings(StrictModel):
    """How a model is served (``raypipe serve``, ``serve.deploy``).

    Attributes:
        host: the address the HTTP proxy listens on (``0.0.0.0`` to be reached from other
            machines; a cluster-wide setting of Ray Serve, fixed when Serve first starts).
        port: its port (likewise cluster-wide).
        name: the Serve application's name; default: the registered model's name, or
            ``model`` for a run's artifact.
        route_prefix: where the application's endpoints live under the proxy.
        proxy_location: ``EveryNode`` (a proxy on each node with a replica: Ray's default) or
            ``HeadOnly``.
        replicas: fixed number of replicas (ignored when ``autoscaling`` is set).
        autoscaling: replicas that follow the load instead.
        cpus_per_replica: CPUs Ray reserves for each replica.
        threads: torch threads per replica; default: its CPUs (at least 1). Ray sets
            ``OMP_NUM_THREADS`` to the replica's CPUs; this sets torch's own count on purpose.
        max_batch_size: requests one forward pass takes together (dynamic batching); 1 turns
            batching off.
        batch_wait_ms: how long a batch waits to fill before it runs anyway.
        max_ongoing_requests: requests a replica takes at once; at least ``max_batch_size``,
            or batches never fill. Default: twice ``max_batch_size``, and at least
            ``MIN_ONGOING``. Keep replicas x this above the clients' concurrency: Serve's
            router, finding every replica full, retries each request with a backoff of up to
            0.5 s instead of queueing it.
        follow_every_s: how often a replica serving ``models:/NAME@ALIAS`` checks where the
            alias points, and rolls to the version it moved to.
        tracking_uri: the MLflow tracking (and registry) URI of ``models:/`` models; default:
            ``$MLFLOW_TRACKING_URI``, else the pipeline's (``sqlite:///STORAGE/mlflow.db``).
        limits: what one request may ask for.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]{0,99}$")
    route_prefix: str = Field("/", pattern=r"^/")
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    cpus_per_replica: float = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    follow_every_s: float = Field(5.0, gt=0)
    tracking_uri: str | None = None
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeSettings:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < (
            self.max_batch_size
        ):
            raise ValueError(
                f"max_ongoing_requests {self.max_ongoing_requests} is below max_batch_size "
                f"{self.max_batch_size}: a replica would never hold a full batch"
            )
        return self

    @property
    def ongoing(self) -> int:
        """Requests a replica takes at once."""
        return self.max_ongoing_requests or max(2 * self.max_batch_size, MIN_ONGOING)

    @property
    def torch_threads(self) -> int:
        """Torch threads per replica."""
        return self.threads or max(1, math.floor(self.cpus_per_replica))

    def deployment_options(self) -> dict[str, Any]:
        """The Serve deployment options these settings give (``Deployment.options``)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.ongoing,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            # A new version loads beside the old one, so a swap needs no replica restart;
            # a replica that stops finishes what it holds first.
            "graceful_shutdown_timeout_s": 30.0,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.replicas
        else:
            a = self.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "initial_replicas": max(a.min_replicas, 1),
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
            }
        return options


def read_settings(path: str | Path, **overrides: Any) -> ServeSettings:
    """Serving settings from a YAML file, with ``overrides`` (flags) on top.

    Raises:
        ValueError: the file does not parse, or a key is unknown or mistyped (the message
            names the file and the key).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of serving settings")
    return settings_from(data, overrides, where=str(path))


def settings_from(
    data: dict[str, Any], overrides: dict[str, Any] | None = None, where: str = "settings"
) -> ServeSettings:
    """Validated settings from plain data (a YAML mapping) and flag overrides.

    Raises:
        ValueError: one line per bad key, each naming ``where`` and the key.
    """
    merged = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return ServeSettings.model_validate(merged)
    except ValidationError as e:
        lines = [
            f"{where}: {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
            for err in e.errors()
        ]
        raise ValueError("; ".join(lines)) from None
