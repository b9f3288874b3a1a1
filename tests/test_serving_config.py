"""Every shipped Serve config and the `ctxmem serve` flags build the application they describe (no cluster)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from ctxmem.serving.config import ServeArgs, default_model_name
from helpers_serving import REPO

CONFIGS = sorted((REPO / "infra").glob("serve*.yaml"))


def test_the_shipped_serve_configs_are_the_ones_documented():
    readme = (REPO / "serving" / "README.md").read_text()
    assert [c.name for c in CONFIGS] == ["serve-autoscale.yaml", "serve-gpu.yaml", "serve.yaml"]
    for config in CONFIGS:
        assert f"infra/{config.name}" in readme


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_serve_config_is_valid_and_builds_its_deployments(config: Path, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from ctxmem.serving.app import build_app

    data = yaml.safe_load(config.read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1"
    app = schema.applications[0]
    assert app.import_path == "ctxmem.serving.app:build_app"
    args = ServeArgs.model_validate({**app.args, "model": str(tmp_path)})  # typed: unknown keys fail here
    built = build_app(args)
    deployments = {d.name for d in app.deployments}
    assert deployments == {"Engine", "Ingress"}
    assert built._bound_deployment.name == "Ingress"
    # args.engine is the engine's base config; user_config (live overrides, `reconfigure`) starts empty
    engine = built._bound_deployment.init_args[0]._bound_deployment
    base = engine.init_args[0]
    assert engine.name == "Engine" and engine.user_config == {} and base["model"] == str(tmp_path)
    for key, value in app.args.get("engine", {}).items():
        assert base[key] == value


def test_the_builder_refuses_a_config_without_a_model(monkeypatch):
    from ctxmem.serving.app import build_app

    monkeypatch.delenv("CTXMEM_MODEL", raising=False)
    with pytest.raises(ValueError, match="no model"):
        build_app({})
    with pytest.raises(Exception, match="not_a_knob"):
        build_app({"model": "x", "engine": {"not_a_knob": 1}})


def test_serve_flags_become_typed_builder_arguments():
    from ctxmem.serving.cli import register, serve_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "models:/ctxmem@champion", "--replicas", "3", "--api-key", "k",
                              "--engine-cpus", "0.5", "--max-batch-size", "1", "--port", "9000"])
    assert args.host == "127.0.0.1" and args.port == 9000
    config = serve_args(args).resolve()
    assert config.engine.model == "models:/ctxmem@champion" and config.engine.max_batch_size == 1
    assert config.engine_deployment.num_replicas == 3
    assert config.engine_deployment.ray_actor_options == {"num_cpus": 0.5}
    assert config.model_name == "ctxmem" and len(config.api_key_hashes) == 1


def test_model_names_derive_from_the_spec():
    assert default_model_name("models:/ctxmem-tiny@champion") == "ctxmem-tiny"
    assert default_model_name("/exports/tiny-onnx/") == "tiny-onnx"
