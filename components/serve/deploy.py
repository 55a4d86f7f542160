"""Putting a model behind Ray Serve: :func:`deploy` (what ``raypipe serve`` and the
``serve.deploy`` stage call) and the ``serve.deploy`` stage, so a pipeline can end with
train -> gate -> deploy:

    deploy:
      uses: serve.deploy
      needs: [gate]
      with: {model: "models:/digits-cnn@champion", port: 8000}

Serve applications are detached: they live in the cluster's Serve controller, not in the job
that deployed them, so the application outlives the pipeline's job (on a cluster started with
``ray start`` or ``raypipe cluster up``; an embedded Ray of ``raypipe run`` stops with the
run). Deploying again with the same settings changes nothing; with a model name that follows
an alias, the running application rolls to each version the alias moves to by itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from components.api import Component, StageContext
from components.serve.settings import ServeSettings
from components.serve.source import Source

DEPLOYMENT_FILE = "deployment.json"
#: The environment of Serve's controller, which the proxies it starts inherit: each proxy hands
#: requests to replicas over gRPC (Ray Serve's throughput-optimized path; by default they go
#: through Ray's object store). ``benchmarks/serve.py`` measures it. The same variable set
#: where raypipe deploys from takes precedence. Applied when Serve starts on a cluster.
SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def serve_env() -> dict[str, str]:
    """:data:`SERVE_ENV`, with this process's values of the same variables on top."""
    return {key: os.environ.get(key, value) for key, value in SERVE_ENV.items()}


def deploy(model: str, settings: ServeSettings, timeout_s: float = 300.0) -> dict[str, Any]:
    """Runs (or updates) the Serve application of ``model``; returns where it answers and the
    version it serves.

    Ray must be initialized (this process is a driver or a task of the cluster). Serve is
    started with ``settings``' host, port and proxy location if it is not running yet.

    Raises:
        LookupError: the registry has no such model, alias or version.
        FileNotFoundError: a model folder that is not here.
        RuntimeError: Serve already runs on this cluster with its proxy elsewhere (host and
            port are fixed when Serve starts).
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    from components.serve.app import application

    source = Source(model, settings.tracking_uri)
    source.current()  # an unknown model fails here, in one line, not in every replica
    if source.name.path is not None and not (Path(source.name.path) / "bundle.json").is_file():
        raise FileNotFoundError(f"{source.name.path}: not a model artifact (no bundle.json)")
    settings = settings.model_copy(update={"tracking_uri": source.tracking_uri})
    name = settings.name or source.name.name or "model"
    serve.start(
        http_options={"host": settings.host, "port": settings.port},
        proxy_location=settings.proxy_location,
        controller_options={"runtime_env": {"env_vars": serve_env()}},
    )
    http = _get_global_client().http_config
    if (http.host, http.port) != (settings.host, settings.port):
        raise RuntimeError(
            f"Ray Serve already runs on this cluster with its proxy on {http.host}:{http.port}"
            f" (fixed when Serve started); deploy with host {http.host} and port {http.port}, "
            "or stop Serve first (`serve shutdown`)"
        )
    handle = serve.run(application(model, settings), name=name, route_prefix=settings.route_prefix)
    served = handle.describe.remote().result(timeout_s=timeout_s)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return {
        "app": name,
        "url": f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}",
        "endpoint": served["endpoint"],
        "model": served["model"],
        "name": served["name"],
        "version": served["version"],
        "follows": served["follows"],
    }


class ServeDeployConfig(ServeSettings):
    """Settings of ``serve.deploy``: what to serve, and how (every serving setting).

    Attributes:
        model: ``models:/NAME@ALIAS`` (the application follows the alias: a gate in
            ``needs:`` that moves ``champion`` is served by itself), or ``models:/NAME/VERSION``;
            null: the trained model in ``needs:``, served from its artifact folder (which every
            node must be able to read).
    """

    model: str | None = None


class ServeDeploy(Component):
    """Serves a model with Ray Serve (detached: the application outlives the pipeline)."""

    version = "1"
    Config = ServeDeployConfig
    produces = "service/serve"
    resources_affect_output = False

    def stale_because(self, artifact: Path) -> str | None:
        """A cached deployment stands only while its application runs and serves the same
        model: one deleted (``serve delete``), replaced, or lost with its cluster is deployed
        again when the pipeline runs again."""
        from ray import serve

        deployed = json.loads((artifact / DEPLOYMENT_FILE).read_text())
        app = serve.status().applications.get(deployed["app"])
        if app is None or app.status != "RUNNING":
            state = "not on this cluster" if app is None else app.status
            return f"its Serve application {deployed['app']!r} is {state}"
        try:
            served = serve.get_app_handle(deployed["app"]).describe.remote().result(timeout_s=60)
        except Exception as e:  # another application under the name: it has no describe()
            return f"its Serve application {deployed['app']!r} does not answer ({type(e).__name__})"
        if served.get("model") != deployed["model"]:
            return f"its Serve application {deployed['app']!r} now serves {served.get('model')!r}"
        return None

    def run(self, ctx: StageContext, config: ServeDeployConfig) -> dict[str, Any]:
        model = config.model
        if model is None:
            found = ctx.inputs_of("model")
            if len(found) != 1:
                have = {name: a.kind for name, a in ctx.inputs.items()}
                raise ValueError(
                    f"stage {ctx.stage!r} serves `model:` (models:/NAME@ALIAS) or the one "
                    f"trained model in `needs:`; it has {have}"
                )
            model = str(found[0].path)
        settings = ServeSettings.model_validate(
            {
                **config.model_dump(exclude={"model"}),
                "tracking_uri": config.tracking_uri or ctx.tracking_uri,
            }
        )
        deployed = deploy(model, settings)
        (ctx.out_dir / DEPLOYMENT_FILE).write_text(json.dumps(deployed, indent=1, sort_keys=True))
        return deployed
