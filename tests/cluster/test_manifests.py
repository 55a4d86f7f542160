"""The files in cluster/ parse, and their fields that matter agree: image, command, resources,
token auth, overlap protection. (Nothing here needs Kubernetes or a cloud account.)"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from cluster_helpers import ROOT

from pipelines import spec

CLUSTER = ROOT / "cluster"
IMAGE = "raypipe:0.1.0"


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def ray_cluster_containers(cluster_spec: dict) -> list[dict]:
    found = containers(cluster_spec["headGroupSpec"]["template"])
    for group in cluster_spec["workerGroupSpecs"]:
        found += containers(group["template"])
    return found


def check_cluster_spec(cluster_spec: dict) -> None:
    assert cluster_spec["rayVersion"] == "2.60.0"
    assert cluster_spec["authOptions"]["mode"] == "token"
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # drivers ask for CPUs elsewhere
    ports = {p["name"]: p["containerPort"] for p in containers(head["template"])[0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    for c in ray_cluster_containers(cluster_spec):
        assert c["image"] == IMAGE
        res = c["resources"]
        assert res["requests"]["cpu"] and res["limits"]["memory"] == res["requests"]["memory"]
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


def test_raycluster_has_token_auth_and_one_image():
    (doc,) = load("kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    check_cluster_spec(doc["spec"])
    assert doc["spec"]["authOptions"]["secretName"] == "raypipe-ray-token"
    gpu = next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_runs_a_pipeline_once_on_an_authenticated_cluster():
    (doc,) = load("kuberay/rayjob.yaml")
    assert doc["kind"] == "RayJob"
    job = doc["spec"]
    check_cluster_spec(job["rayClusterSpec"])
    args = raypipe_command(shlex.split(job["entrypoint"]))
    assert args[0] == "run" and args[-2:] == ["--address", "auto"]
    check_pipeline_args(args)
    assert job["entrypointNumCpus"] >= 1
    assert job["backoffLimit"] == 0 and job["shutdownAfterJobFinishes"] is True


def test_scheduled_rayjob_never_overlaps():
    (doc,) = load("kuberay/scheduled-rayjob.yaml")
    assert doc["kind"] == "CronJob"
    cron = doc["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    retrain = spec.load(ROOT / "pipelines/retrain.yaml")
    assert cron["schedule"] == retrain.spec.schedule
    (container,) = containers(cron["jobTemplate"]["spec"]["template"])
    assert container["image"] == IMAGE
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


def test_cluster_launcher_config():
    (doc,) = load("launcher/aws.yaml")
    assert doc["provider"]["type"] == "aws" and doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert doc["docker"]["image"].endswith(IMAGE)
    for command in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=" in command
    head_start = " ".join(doc["head_start_ray_commands"])
    assert "--head" in head_start and "--num-cpus=0" in head_start


def test_dockerfile_is_ray_2_60():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-", text, re.M)
    assert "pip install --no-cache-dir ." in text


@pytest.mark.parametrize(
    "name",
    ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/scheduled-rayjob.yaml"],
)
def test_readme_has_the_commands_for_each_manifest(name):
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl apply -f cluster/{name}" in readme
    assert "ray up cluster/launcher/aws.yaml" in readme
    assert "raypipe cluster up --workers 2" in readme
