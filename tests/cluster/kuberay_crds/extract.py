"""Copies the RayCluster, RayJob and RayService CRD schemas of KubeRay releases into this folder.

    python tests/cluster/kuberay_crds/extract.py /path/to/kuberay-checkout v1.6.2 v1.7.0

For each tag and kind it reads ``ray-operator/config/crd/bases/ray.io_KIND.yaml`` (KIND:
rayclusters, rayjobs, rayservices) with ``git show TAG:PATH``, keeps the ``openAPIV3Schema``
of the served ``v1`` version, drops the ``description`` texts (about 85% of the bytes;
nothing validates against them) and writes ``TAG/KIND.json.gz`` (gzip, mtime 0, sorted
keys: the same input gives the same bytes). ``SOURCES.json`` records the tag, its commit
and the path of each file.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("rayclusters", "rayjobs", "rayservices")


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(repo: str, tags: list[str]) -> None:
    import yaml

    sources = (
        json.loads((HERE / "SOURCES.json").read_text()) if (HERE / "SOURCES.json").exists() else {}
    )
    for tag in tags:
        commit = subprocess.run(
            ["git", "-C", repo, "rev-parse", f"{tag}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for kind in KINDS:
            path = f"ray-operator/config/crd/bases/ray.io_{kind}.yaml"
            text = subprocess.run(
                ["git", "-C", repo, "show", f"{tag}:{path}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            crd = yaml.safe_load(text)
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = _strip(version["schema"]["openAPIV3Schema"])
            data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
            out = HERE / tag / f"{kind}.json.gz"
            out.parent.mkdir(exist_ok=True)
            out.write_bytes(gzip.compress(data, mtime=0))
            sources[f"{tag}/{kind}.json.gz"] = {
                "repository": "https://github.com/ray-project/kuberay",
                "tag": tag,
                "commit": commit,
                "path": path,
                "kind": crd["spec"]["names"]["kind"],
                "version": "v1",
            }
    (HERE / "SOURCES.json").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
