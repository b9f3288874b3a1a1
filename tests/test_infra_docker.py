"""The container images (infra/docker/), checked without a Docker engine (none runs on these machines; the
images have not been built here): each Dockerfile starts from the Ray image of the Ray we test with, copies
only paths that exist and every folder the package installs from, installs through infra/bootstrap.sh (the
fresh-machine path) with the flavour and extras it names, pins every package to the version the tests ran
on, and runs as a non-root user."""
from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "infra" / "docker"
IMAGES = {"cpu": ("Dockerfile.cpu", "cpu"), "gpu": ("Dockerfile.cuda", "cu128")}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.mark.parametrize("flavour", sorted(IMAGES))
def test_the_image_builds_from_the_pinned_ray_image_through_bootstrap(flavour):
    import ray

    name, platform = IMAGES[flavour]
    steps = _instructions(DOCKER / name)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert args["RAY_VERSION"] == ray.__version__  # the base image's Ray is the Ray the tests ran
    (base,) = [a for kind, a in steps if kind == "FROM"]
    assert base == f"rayproject/ray:${{RAY_VERSION}}-py311-{platform}"
    assert "latest" not in base
    # every COPY source exists, and every folder pyproject installs from is copied (plus its readme)
    copied = set()
    for kind, a in steps:
        if kind == "COPY":
            *sources, _ = [w for w in a.split() if not w.startswith("--")]
            for s in sources:
                assert (REPO / s).exists(), f"{name}: COPY {s}: no such path"
                copied.add(s.rstrip("/"))
    needed = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "README.md", "infra"}
    assert needed <= copied, needed - copied
    # one install path: bootstrap.sh, with the flavour, extras and constraints named
    (install,) = [a for kind, a in steps if kind == "RUN" and "infra/bootstrap.sh" in a]
    env = dict(re.findall(r"(\w+)=(\S+)", install.split("bash infra/bootstrap.sh")[0]))
    assert env["CTXMEM_FLAVOUR"] == flavour
    extras = set(env["CTXMEM_EXTRAS"].split(","))
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]) and "dev" not in extras
    assert {"train", "export", "serve", "postgres"} <= extras
    assert (REPO / env["PIP_CONSTRAINT"].removeprefix("/app/")).is_file()
    assert not [a for kind, a in steps if kind == "RUN" and re.search(r"pip3? install", a)], "a second install path"
    # runs as the Ray image's non-root user from the install on
    users = [a for kind, a in steps if kind == "USER"]
    assert users[-1] not in ("root", "0")


def test_the_images_pin_the_versions_the_tests_run_on():
    pins = _constraints()
    assert {"ray", "torch", "deepspeed", "mlflow", "onnx", "onnxruntime", "onnxruntime-gpu"} <= set(pins)
    for name, version in pins.items():
        if name == "onnxruntime-gpu":  # the CUDA image's; CPU machines have the onnxruntime it replaces
            continue
        installed = metadata.version(name).split("+")[0]  # torch 2.13.0+cpu is torch==2.13.0
        assert installed == version, f"constraints.txt pins {name}=={version}, the tests run {installed}"


def test_bootstrap_refuses_an_unknown_flavour_or_extras_before_installing_anything(tmp_path):
    for env, message in (({"CTXMEM_FLAVOUR": "tpu"}, "CTXMEM_FLAVOUR must be cpu or gpu"),
                         ({"CTXMEM_EXTRAS": "all;rm -rf"}, "CTXMEM_EXTRAS must be comma-separated")):
        done = subprocess.run(["bash", str(REPO / "infra" / "bootstrap.sh")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "CTXMEM_VENV": str(tmp_path / "venv"), **env}, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "venv").exists()
