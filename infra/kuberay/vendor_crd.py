#!/usr/bin/env python
"""Writes the subset of KubeRay's CRD schemas that tests/test_infra_kuberay.py checks our manifests
against: the `v1` openAPIV3Schema of RayJob and RayService with every description dropped and every
embedded Kubernetes object (pod templates, Services) cut to a stub - those parts are checked against
the Kubernetes schemas themselves (kubernetes-validate), so only KubeRay's own field names stay.

    python infra/kuberay/vendor_crd.py KUBERAY/ray-operator/config/crd/bases/ray.io_rayjobs.yaml \\
        KUBERAY/ray-operator/config/crd/bases/ray.io_rayservices.yaml --ref v1.7.0

KUBERAY is a checkout of github.com/ray-project/kuberay at the tag given (Apache-2.0: its licence is copied to infra/kuberay/crd/LICENSE).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# Kubernetes objects embedded in KubeRay's kinds: pod templates (a `spec` with `containers`) and
# Services (a `spec` with `ports`). Their schemas are Kubernetes', not KubeRay's.
STUB = {"type": "object", "x-ctxmem-stub": "a Kubernetes object: checked with kubernetes-validate"}


def is_embedded_object(node: dict) -> bool:
    spec = node.get("properties", {}).get("spec", {}).get("properties", {})
    return "containers" in spec or ("ports" in spec and "selector" in spec)


def prune(node):
    if isinstance(node, dict):
        if is_embedded_object(node):
            return dict(STUB)
        return {k: prune(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [prune(v) for v in node]
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("crds", nargs="+", help="KubeRay CRD YAML files (ray.io_*.yaml)")
    parser.add_argument("--ref", required=True, help="the KubeRay tag the files come from, e.g. v1.7.0")
    args = parser.parse_args()
    for path in map(Path, args.crds):
        crd = yaml.safe_load(path.read_text())
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out = {"source": f"github.com/ray-project/kuberay@{args.ref}:ray-operator/config/crd/bases/{path.name}",
               "license": "Apache-2.0, Copyright the KubeRay authors; modified (descriptions and embedded Kubernetes objects removed); full text in LICENSE beside this file",
               "kind": crd["spec"]["names"]["kind"], "apiVersion": f"{crd['spec']['group']}/v1",
               "schema": prune(v1["schema"]["openAPIV3Schema"])}
        target = HERE / "crd" / (path.stem + ".json")
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"{target.relative_to(HERE.parent.parent)}: {target.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
