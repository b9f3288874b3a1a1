"""The KubeRay manifests (infra/kuberay-rayjob.yaml, infra/kuberay-rayservice.yaml) validate and keep their
secure defaults: KubeRay's own fields against the field names of KubeRay's CRDs (the v1.7.0 subset vendored
in infra/kuberay/crd/), every embedded pod template against the Kubernetes schemas (kubernetes-validate,
strict), token auth from a Secret, the dashboard on 0.0.0.0 only with it, non-root containers, requests and
limits, pinned images; the RayService's Serve config is infra/serve-autoscale.yaml as rendered (never
re-typed) and builds through Ray Serve's own application builder."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = {"RayJob": INFRA / "kuberay-rayjob.yaml", "RayService": INFRA / "kuberay-rayservice.yaml"}
CRDS = {"RayJob": INFRA / "kuberay" / "crd" / "ray.io_rayjobs.json",
        "RayService": INFRA / "kuberay" / "crd" / "ray.io_rayservices.json"}
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests claim (KubeRay v1.7.0 supports it)


def _load(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def _cluster(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def _pod_templates(doc: dict) -> dict[str, dict]:
    cluster = _cluster(doc)
    found = {"head": cluster["headGroupSpec"]["template"]}
    found.update({f"worker {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    if "submitterPodTemplate" in doc["spec"]:
        found["submitter"] = doc["spec"]["submitterPodTemplate"]
    return found


def _closed(schema):
    """The CRD schema with unknown field names refused: `additionalProperties: false` wherever an object
    lists its properties (the API server would prune an unknown field silently - a typo'd securityContext
    or authOptions would just vanish)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _render_module():
    spec = importlib.util.spec_from_file_location("render_rayservice", INFRA / "kuberay" / "render_rayservice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_fields_are_the_crd_field_names(kind):
    import jsonschema

    crd = json.loads(CRDS[kind].read_text())
    assert crd["source"].startswith("github.com/ray-project/kuberay@v1.7.0:") and "Apache-2.0" in crd["license"]
    assert (CRDS[kind].parent / "LICENSE").read_text().lstrip().startswith("Apache License")
    doc = _load(kind)
    assert (doc["apiVersion"], doc["kind"]) == (crd["apiVersion"], crd["kind"])
    validator = jsonschema.Draft7Validator(_closed(crd["schema"]))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)
    # the check bites: a misspelt KubeRay field is refused
    broken = copy.deepcopy(doc)
    _cluster(broken)["authOption"] = _cluster(broken).pop("authOptions")
    assert any("authOption" in e.message for e in validator.iter_errors(broken))


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_pod_template_is_a_valid_kubernetes_pod_template(kind):
    import kubernetes_validate

    for where, template in _pod_templates(_load(kind)).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ctxmem-{kind.lower()}"},
                   "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)  # raises, naming the field
    bad = copy.deepcopy(wrapped)
    bad["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # strict: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_secure_defaults(kind):
    import ray

    doc = _load(kind)
    cluster = _cluster(doc)
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] == "ctxmem-ray-auth"  # a Secret, not a literal token
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        host = group["rayStartParams"].get("dashboard-host", "127.0.0.1")
        assert host != "0.0.0.0" or auth["mode"] == "token", "dashboard on 0.0.0.0 needs token auth"
    assert cluster["rayVersion"] == ray.__version__
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for where, template in _pod_templates(doc).items():
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in template["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where}: {bound}"
            # pinned: the tag infra/docker/Dockerfile.cpu documents (ctxmem version, Ray version), never latest
            assert c["image"] == f"ctxmem:{version}-ray{ray.__version__}-cpu", (where, c["image"])
            for env in c.get("env", []):
                assert "value" not in env or not re.search(r"(?i)token|key|password", env["name"]), env
    docker = (INFRA / "docker" / "Dockerfile.cpu").read_text()
    assert f"-t ctxmem:{version}-ray{ray.__version__}-cpu" in docker


def test_the_rayservice_is_rendered_from_the_serve_config_not_retyped():
    render = _render_module()
    committed = MANIFESTS["RayService"].read_text()
    assert committed == render.render(reload_nonce=render.committed_nonce()), \
        "infra/kuberay-rayservice.yaml is stale: run python infra/kuberay/render_rayservice.py"
    served = yaml.safe_load(yaml.safe_load(committed)["spec"]["serveConfigV2"])
    source = yaml.safe_load((INFRA / "serve-autoscale.yaml").read_text())
    # exactly the documented in-cluster changes, nothing else
    source["http_options"]["host"] = "0.0.0.0"
    source["applications"][0]["args"]["session_store"] = render.REDIS
    next(d for d in source["applications"][0]["deployments"] if d["name"] == "Engine")["user_config"] = \
        {"reload_nonce": render.committed_nonce()}
    assert served == source
    # a promotion roll-out changes the nonce and nothing else
    bumped = yaml.safe_load(yaml.safe_load(render.render(reload_nonce=7))["spec"]["serveConfigV2"])
    assert bumped["applications"][0]["deployments"][0]["user_config"] == {"reload_nonce": 7}


def test_the_embedded_serve_config_builds_with_ray_serves_application_builder(monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("CTXMEM_API_KEYS", "a-test-key")  # as the Secret ctxmem-api-keys provides it in the pods
    serve = yaml.safe_load(_load("RayService")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve)  # what KubeRay submits is a valid Serve deploy config
    assert schema.http_options.host == "0.0.0.0"
    for app in serve["applications"]:
        # what Serve's controller does with import_path + args on deploy (one-parameter builder, typed args)
        application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
        built = build_app(application, name=app["name"])
        names = {d.name for d in built.deployments}
        assert {d["name"] for d in app["deployments"]} <= names, names
