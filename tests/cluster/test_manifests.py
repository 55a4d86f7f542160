"""The files in cluster/, checked by the schemas their consumers check them with, and their
fields that matter: image, command, resources, token auth, autoscaling, GPUs, overlap
protection. (Nothing here needs Kubernetes, Docker or a cloud account.)

- KubeRay resources: the ``openAPIV3Schema`` of the RayCluster, RayJob and RayService CRDs of every
  supported KubeRay release (copied into ``kuberay_crds/``, see ``SOURCES.json`` there), with
  unknown fields rejected as ``kubectl apply`` (strict field validation) rejects them.
- Kubernetes' own kinds (CronJob, ServiceAccount): Kubernetes' schemas, strict, from the
  ``kubernetes-validate`` package.
- The cluster launcher config: the ``ray-schema.json`` inside the installed ``ray`` package,
  before and after Ray fills in its AWS defaults (as ``ray up`` does).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cluster_helpers import ROOT

from pipelines import spec

CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).parent / "kuberay_crds"
KUBERAY_RELEASES = sorted(p.name for p in CRDS.iterdir() if p.is_dir())
CRD_FILES = {
    "RayCluster": "rayclusters.json.gz",
    "RayJob": "rayjobs.json.gz",
    "RayService": "rayservices.json.gz",
}
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
IMAGE, GPU_IMAGE = "REGISTRY/raypipe:0.1.0", "REGISTRY/raypipe:0.1.0-gpu"
WORKDIR = "/home/ray/raypipe"  # the Dockerfile's WORKDIR (checked below)
MANIFESTS = sorted(p.relative_to(CLUSTER).as_posix() for p in (CLUSTER / "kuberay").glob("*.yaml"))


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


# --- KubeRay CRD schemas --------------------------------------------------------------------


def strict_schema(node):
    """An ``openAPIV3Schema`` as JSON Schema, with the API server's view of unknown fields.

    Kubernetes prunes (or, with strict field validation, rejects) any field a structural
    schema does not declare, except below ``x-kubernetes-preserve-unknown-fields``. An object
    with ``properties`` therefore gets ``additionalProperties: false``; ``nullable`` becomes a
    null type. ``x-kubernetes-int-or-string`` fields already carry their ``anyOf``.
    """
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable") is True and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


@cache
def crd_schema(release: str, kind: str) -> dict:
    raw = json.loads(gzip.decompress((CRDS / release / CRD_FILES[kind]).read_bytes()))
    return raw


def cel_paths(node, path=()) -> list[tuple[str, ...]]:
    """The fields whose rules are CEL (``x-kubernetes-validations``), which no Python validator
    runs: the manifests must leave them out for the schema check to be the whole check."""
    found = []
    if isinstance(node, dict):
        if "x-kubernetes-validations" in node:
            found.append(path)
        for key, value in node.get("properties", {}).items():
            found += cel_paths(value, (*path, key))
        if "items" in node:
            found += cel_paths(node["items"], path)
    return found


def crd_errors(doc: dict, release: str) -> list[str]:
    """Every schema error of a KubeRay resource against one release's CRD, as lines."""
    schema = crd_schema(release, doc["kind"])
    validator = jsonschema.Draft4Validator(strict_schema(schema))
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    for path in cel_paths(schema):
        node = doc
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            errors.append(f"{'.'.join(path)}: set, but only a CEL rule checks it")
    return errors


def kubernetes_errors(doc: dict) -> list[str]:
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


def test_the_crd_copies_are_the_supported_releases():
    sources = json.loads((CRDS / "SOURCES.json").read_text())
    assert KUBERAY_RELEASES == ["v1.6.0", "v1.6.2", "v1.7.0"]
    for release in KUBERAY_RELEASES:
        for kind, file in CRD_FILES.items():
            source = sources[f"{release}/{file}"]
            assert source["tag"] == release and source["kind"] == kind
            assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
            assert crd_schema(release, kind)["properties"]["spec"]["type"] == "object"


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_passes_its_consumers_schema(name):
    for doc in load(name):
        if doc["apiVersion"] == "ray.io/v1":
            errors = [f"KubeRay {r}: {e}" for r in KUBERAY_RELEASES for e in crd_errors(doc, r)]
        else:
            errors = kubernetes_errors(doc)
        assert not errors, f"cluster/{name} ({doc['kind']}):\n" + "\n".join(errors)


def test_the_schema_checks_reject_what_the_api_server_rejects():
    (cluster,) = load("kuberay/raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["enableInTreeAutoscalling"] = True  # a typo KubeRay would drop silently
    group = typo["spec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["workDir"] = WORKDIR
    group["maxReplicas"] = "8"
    errors = crd_errors(typo, KUBERAY_RELEASES[-1])
    assert any("enableInTreeAutoscalling" in e for e in errors), errors
    assert any("workDir" in e for e in errors), errors
    assert any("maxReplicas" in e and "integer" in e for e in errors), errors
    # Where a CEL rule is the check, setting the field is refused (it would go unchecked).
    managed = copy.deepcopy(cluster)
    managed["spec"]["managedBy"] = "someone"
    assert any("CEL" in e for e in crd_errors(managed, KUBERAY_RELEASES[-1]))
    (cron,) = load("kuberay/scheduled-rayjob.yaml")
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["workdir"] = "/"
    assert any("workdir" in e for e in kubernetes_errors(cron))


# --- what the manifests say -----------------------------------------------------------------


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster_spec["workerGroupSpecs"]
    ]


def check_cluster_spec(cluster_spec: dict, **more_ports: int) -> None:
    assert cluster_spec["rayVersion"] == metadata.version("ray")
    assert cluster_spec["authOptions"]["mode"] == "token"
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # drivers ask for CPUs elsewhere
    ports = {p["name"]: p["containerPort"] for p in containers(head["template"])[0]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, **more_ports}
    (account,) = load("kuberay/serviceaccount.yaml")
    for template in pod_templates(cluster_spec):
        # S3 credentials: the service account (IRSA) or the optional Secret.
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        for c in containers(template):
            assert c["workingDir"] == WORKDIR  # the driver starts in the project, explicitly
            assert {"secretRef": {"name": "raypipe-storage", "optional": True}} in c["envFrom"]
            res = c["resources"]
            assert res["requests"]["cpu"] and res["limits"]["memory"] == res["requests"]["memory"]
            gpus = res["limits"].get("nvidia.com/gpu")
            assert c["image"] == (GPU_IMAGE if gpus else IMAGE)
            if gpus:
                tolerations = template["spec"]["tolerations"]
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                    tolerations
                )
    for group in cluster_spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def raypipe_command(words: list[str]) -> list[str]:
    """The raypipe arguments of a command (``raypipe ...`` or ``python -m pipelines.cli ...``)."""
    if words[:3] == ["python", "-m", "pipelines.cli"]:
        return words[3:]
    assert words[0] == "raypipe", words
    return words[1:]


def check_pipeline_args(args: list[str]) -> None:
    """The pipeline file exists and validates with the overrides the manifest passes."""
    file = ROOT / args[1]
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("-")]
    pipeline = spec.load(file, overrides)
    assert pipeline.storage.startswith("s3://")  # multi-node: shared storage


def test_raycluster_autoscales_has_gpus_token_auth_and_the_images():
    (doc,) = load("kuberay/raycluster.yaml")
    check_cluster_spec(doc["spec"])
    assert doc["spec"]["authOptions"]["secretName"] == "raypipe-ray-token"
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert groups["cpu"]["minReplicas"] < groups["cpu"]["maxReplicas"]
    gpu = containers(groups["gpu"]["template"])[0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]


def test_rayjob_runs_a_pipeline_once_on_an_authenticated_cluster():
    (doc,) = load("kuberay/rayjob.yaml")
    job = doc["spec"]
    check_cluster_spec(job["rayClusterSpec"])
    args = raypipe_command(shlex.split(job["entrypoint"]))
    assert args[0] == "run" and args[-2:] == ["--ray-address", "auto"]
    check_pipeline_args(args)
    assert job["entrypointNumCpus"] >= 1 and job["backoffLimit"] == 0
    assert job["shutdownAfterJobFinishes"] is True


def test_scheduled_rayjob_never_overlaps():
    (doc,) = load("kuberay/scheduled-rayjob.yaml")
    assert doc["kind"] == "CronJob" and doc["spec"]["concurrencyPolicy"] == "Forbid"
    retrain = spec.load(ROOT / "pipelines/retrain.yaml")
    assert doc["spec"]["schedule"] == retrain.spec.schedule
    (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE and container["workingDir"] == WORKDIR
    args = raypipe_command(container["command"])
    assert args[0] == "submit" and args[1] == "pipelines/retrain.yaml"
    check_pipeline_args(args)
    assert {"--exclusive", "--wait"} <= set(args)
    assert args[args.index("--key") + 1] == "$(TICK)"
    assert args[args.index("--address") + 1] == "http://raypipe-head-svc:8265"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "raypipe-ray-token"
    assert "value" not in env["RAY_AUTH_TOKEN"]  # never a literal token in a manifest
    assert "job-name" in env["TICK"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_rayservice_serves_the_champion_with_serves_own_schema():
    """The RayService's ``serveConfigV2`` passes Ray Serve's own config schema (what ``serve
    deploy`` and KubeRay send to the Serve controller), and its application's ``args`` build
    raypipe's application with the settings they say."""
    from ray.serve.schema import ServeDeploySchema

    from components.serve.app import build_app
    from components.serve.deploy import SERVE_ENV  # what `raypipe serve` starts Serve with
    from components.serve.settings import ServeSettings

    (doc,) = load("kuberay/rayservice.yaml")
    cluster_spec = doc["spec"]["rayClusterConfig"]
    check_cluster_spec(cluster_spec, serve=8000)
    assert cluster_spec["authOptions"]["secretName"] == "raypipe-ray-token"
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 8000)
    assert config.controller_options.runtime_env == {"env_vars": SERVE_ENV}
    for template in pod_templates(cluster_spec):  # KubeRay's serve Service targets this port
        assert {"containerPort": 8000, "name": "serve"} in containers(template)[0]["ports"]
    (application,) = config.applications
    assert application.import_path == "components.serve.app:build_app"
    args = dict(application.args)
    assert args["model"] == "models:/digits-cnn@champion"  # follows the gate's alias
    settings = ServeSettings.model_validate({k: v for k, v in args.items() if k != "model"})
    assert settings.autoscaling is not None and settings.autoscaling.max_replicas > 1
    app = build_app(args)  # builds the application (does not run it): no Ray needed
    options = app._bound_deployment._deployment_config
    assert options.max_ongoing_requests >= settings.max_batch_size
    assert options.autoscaling_config.max_replicas == settings.autoscaling.max_replicas
    with pytest.raises(ValueError, match="args need `model`"):
        build_app({k: v for k, v in args.items() if k != "model"})


# --- the cluster launcher ---------------------------------------------------------------------


def test_cluster_launcher_config_passes_ray_schema_and_states_every_command():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    (doc,) = load("launcher/aws.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)  # as written: no unknown or mistyped key
    filled = prepare_config(copy.deepcopy(doc))  # what `ray up` runs: Ray's AWS defaults added
    validate_config(filled)
    lists = ("initialization_commands", "setup_commands", "head_setup_commands")
    for key in (*lists, "worker_setup_commands", "file_mounts"):
        assert key in doc, f"{key} left to Ray's defaults"
        assert filled[key] == doc[key]
    commands = " ".join(c for key in lists for c in filled[key])
    assert "ray-wheels" not in commands and "pip install" not in commands

    nodes = doc["available_node_types"]
    assert nodes[doc["head_node_type"]]["resources"] == {"CPU": 0}
    assert doc["docker"]["image"] == IMAGE
    assert nodes["gpu_worker"]["docker"]["worker_image"] == GPU_IMAGE
    # The head has a profile of its own (so Ray makes no role): README says what it may do.
    profiles = {n: t["node_config"]["IamInstanceProfile"]["Name"] for n, t in nodes.items()}
    assert profiles == {
        "head": "raypipe-head",
        "cpu_worker": "raypipe-worker",
        "gpu_worker": "raypipe-worker",
    }
    readme = (CLUSTER / "README.md").read_text()
    assert "iam:PassRole" in readme and "raypipe-head" in readme and "raypipe-worker" in readme
    for command in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=" in command
    head_start = " ".join(doc["head_start_ray_commands"])
    assert "--head" in head_start and "--num-cpus=0" in head_start


def test_the_readme_token_command_works_on_a_fresh_machine(tmp_path):
    """The token line of cluster/README.md, run as written in an empty home directory."""
    readme = (CLUSTER / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if "~/.raypipe/aws-token" in ln and ">" in ln]
    done = subprocess.run(
        ["bash", "-c", line],
        env={
            "HOME": str(tmp_path),
            "PATH": f"{Path(__import__('sys').executable).parent}:/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    token = tmp_path / ".raypipe" / "aws-token"
    assert re.fullmatch(r"[0-9a-f]{64}\n", token.read_text())
    assert token.stat().st_mode & 0o077 == 0  # nobody else may read it


# --- the images -------------------------------------------------------------------------------


def test_one_dockerfile_builds_the_cpu_and_the_gpu_image():
    text = (CLUSTER / "Dockerfile").read_text()
    ray_version, torch_version = metadata.version("ray"), metadata.version("torch").split("+")[0]
    assert re.search(r"^ARG ACCEL=cpu$", text, re.M)
    # The accelerator picks the Ray base image and the torch wheel index together.
    assert f"FROM rayproject/ray:{ray_version}-py311-${{ACCEL}}" in text
    assert (
        f'"torch=={torch_version}" --index-url "https://download.pytorch.org/whl/${{ACCEL}}"'
        in text
    )
    assert f"WORKDIR {WORKDIR}" in text and f"ENV RAYPIPE_PROJECT={WORKDIR}" in text
    assert 'pip install --no-cache-dir ".[aws]"' in text  # not editable: submission must cope
    readme = (CLUSTER / "README.md").read_text()
    assert "--build-arg ACCEL=cu128" in readme and f"-t {GPU_IMAGE}" in readme


def test_readme_has_the_commands_for_each_manifest():
    readme = (CLUSTER / "README.md").read_text()
    for name in MANIFESTS:
        assert f"kubectl apply -f cluster/{name}" in readme, name
    assert "ray up cluster/launcher/aws.yaml" in readme
    assert "raypipe cluster up --workers 2" in readme
    # The operator's version is pinned, and it is one the CRD copies cover.
    (pinned,) = re.findall(r"kuberay/kuberay-operator --version (\S+)", readme)
    assert f"v{pinned}" in KUBERAY_RELEASES
