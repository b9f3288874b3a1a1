"""The typed training config, the DeepSpeed config built from it, and every file shipped in infra/."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

from ctxmem.cli import build_parser
from ctxmem.net import free_port, unreachable
from ctxmem.training.cli import _hostfile_slots
from ctxmem.training.config import TrainConfig
from ctxmem.training.data import prepare
from ctxmem.training.errors import TrainConfigError
from ctxmem.training.zero import build_ds_config, zero_state_bytes
from helpers_training import REPO

CONFIGS = sorted((REPO / "infra").glob("train-*.yaml"))


def test_every_shipped_training_config_is_listed_here_and_resolves():
    # a new config must be added to the tests that run it (test_training_run.py)
    assert {c.name for c in CONFIGS} == {"train-tiny.yaml", "train-cpu-demo.yaml", "train-gpu-124m.yaml",
                                         "train-ray-cpu.yaml", "train-cpu-memory.yaml",
                                         "train-gpu-memory.yaml"}  # memory: test_bench_sinks.py and below
    for path in CONFIGS:
        cfg = TrainConfig.load(path)
        assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # round-trips
        assert cfg.seq_len <= cfg.model.build(263).max_seq_len


def test_the_gpu_memory_config_trains_the_cpu_memory_model_on_its_data_for_longer():
    # the README's recall numbers come from this config on a GPU; the CPU config is its 20-minute cut
    cpu = TrainConfig.load(REPO / "infra" / "train-cpu-memory.yaml")
    gpu = TrainConfig.load(REPO / "infra" / "train-gpu-memory.yaml")
    assert gpu.model == cpu.model and gpu.data == cpu.data and gpu.eval.memory == cpu.eval.memory
    assert (gpu.device, gpu.precision) == ("cuda", "bf16")
    tokens = lambda c: c.steps * c.batch.global_batch * c.data.seq_len  # noqa: E731
    assert tokens(gpu) >= 20 * tokens(cpu)  # recall appeared after 20-37M tokens; the CPU config trains ~1M


def test_the_gpu_config_is_gpt_124m_in_bf16_with_zero_2():
    cfg = TrainConfig.load(REPO / "infra" / "train-gpu-124m.yaml")
    model = cfg.model.build(32768)
    assert 110e6 < model.num_params() < 140e6
    ds = build_ds_config(cfg, world_size=8, device="cuda", precision=cfg.runtime(True, True)[1])
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 2
    assert build_ds_config(cfg, 1, "cuda", "bf16")["gradient_accumulation_steps"] == 16
    with pytest.raises(TrainConfigError, match="torch sees no CUDA"):
        cfg.runtime(cuda_available=False)


def test_the_zero_config_is_built_from_the_training_config():
    cfg = TrainConfig.load(REPO / "infra" / "train-tiny.yaml",
                           ["zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true", "optim.grad_clip=0.5"])
    ds = build_ds_config(cfg, world_size=2, device="cpu", precision="fp32")
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5  # always explicit: DeepSpeed defaults to 1.0
    assert ds["optimizer"]["params"]["torch_adam"] and ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2 and not ds["bf16"]["enabled"]
    cpu_adam = cfg.replace(**{"zero.cpu_adam": True})
    assert "torch_adam" not in build_ds_config(cpu_adam, 2, "cpu", "fp32")["optimizer"]["params"]


def test_zero_memory_follows_the_paper_formulas():
    psi = 1_000_000
    assert zero_state_bytes(psi, 0, 4)["total"] == 16 * psi
    assert zero_state_bytes(psi, 1, 4)["total"] == 2 * psi + 2 * psi + 12 * psi / 4
    assert zero_state_bytes(psi, 2, 4)["total"] == 2 * psi + 14 * psi / 4
    assert zero_state_bytes(psi, 3, 4)["total"] == 16 * psi / 4


def test_overrides_are_typed_and_unknown_keys_are_named():
    cfg = TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["optim.lr=1e-3", "steps=3", "model.overrides.dropout=0.1"])
    assert cfg.optim.lr == 1e-3 and cfg.steps == 3 and cfg.model.build(263).dropout == 0.1
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['optim.learning_rate'\].*known keys"):
        TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["optim.learning_rate=1"])
    with pytest.raises(TrainConfigError, match="must be an integer"):
        TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["steps=many"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_shipped_config_loads_and_saves_to_the_same_yaml(path, tmp_path):
    cfg = TrainConfig.load(path)
    saved = cfg.save(tmp_path / "config.yaml")
    assert TrainConfig.load(saved) == cfg and yaml.safe_load(saved.read_text()) == cfg.to_dict()
    # every value written in the file, at any depth, is the value loaded (the rest are defaults)
    def written(raw: dict, loaded: dict, prefix: str = "") -> None:
        for key, value in raw.items():
            if isinstance(value, dict) and value:
                written(value, loaded[key], f"{prefix}{key}.")
            else:
                assert loaded[key] == value, prefix + key
    written(yaml.safe_load(path.read_text()), cfg.to_dict())


@pytest.mark.parametrize("betas", ["[0.9,0.95,0.5]", "[0.9]", "0.9"])
def test_a_list_of_the_wrong_length_is_refused_not_truncated(betas):
    with pytest.raises(TrainConfigError, match=r"optim.betas must be a list of exactly two numbers"):
        TrainConfig.load(REPO / "infra" / "train-tiny.yaml", [f"optim.betas={betas}"])
    cfg = TrainConfig.load(REPO / "infra" / "train-tiny.yaml")
    with pytest.raises(TrainConfigError, match=r"optim.betas must be a list of exactly two numbers"):
        cfg.replace(**{"optim.betas": [0.9, 0.95, 0.5]})  # the Python path validates the same way


@pytest.mark.parametrize("override, message", [
    ("steps=true", r"steps must be an integer, got True"),
    ("zero.stage=2.5", r"zero.stage must be an integer, got 2.5"),
    ("optim.lr=true", r"optim.lr must be a number, got True"),
    ("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
    ("optim.betas=[0.9, yes]", r"optim.betas.1 must be a number, got True"),
    ("tracking.enabled=1", r"tracking.enabled must be true or false, got 1"),
    ("optim=3", r"optim must be a section \(a mapping\), got 3"),
    ("precision=fp8", r"precision='fp8' is not one of"),
    ("batch.micro_batch=0", r"batch.micro_batch must be > 0, got 0"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_its_key(override, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.load(REPO / "infra" / "train-tiny.yaml", [override])


def test_all_unknown_keys_are_named_with_the_known_ones():
    with pytest.raises(TrainConfigError) as info:
        TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["stepz=3", "zero.stages=3"])
    text = str(info.value)
    assert "unknown key(s) ['stepz'] in the top level" in text and "'steps'" in text
    assert "unknown key(s) ['zero.stages'] in section 'zero'; known keys: ['cpu_adam', 'offload_optimizer'" in text


def test_the_learning_rate_warms_up_then_follows_a_cosine():
    o = TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["optim.warmup_steps=4", "steps=20"]).optim
    lrs = [o.lr_at(s, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([o.lr * k / 4 for k in (1, 2, 3, 4)])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(o.min_lr, rel=0.05)


@pytest.mark.parametrize("override, message", [
    ("model.preset=giant", r"unknown preset 'giant'"),
    ("zero.stage=4", r"zero.stage must be 0, 1, 2 or 3"),
    ("zero.offload_params=true", r"offload_params needs zero.stage 3"),
    ("data.seq_len=4096", r"exceeds the model's max_seq_len"),
    ("model.overrides.vocab_size=10", r"vocabulary comes from the prepared data"),
])
def test_impossible_configs_are_refused_with_the_reason(override, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.load(REPO / "infra" / "train-tiny.yaml", [override])


def test_a_batch_the_ranks_cannot_split_is_refused():
    cfg = TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["batch.global_batch=6", "batch.micro_batch=2"])
    assert cfg.accumulation(1) == 3
    with pytest.raises(TrainConfigError, match=r"global_batch=6 is not divisible by world size 2 x batch.micro_batch=2"):
        cfg.accumulation(2)


def test_precisions_the_machine_cannot_run_are_refused():
    cfg = TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["precision=fp16"])
    with pytest.raises(TrainConfigError, match="fp16 needs a CUDA GPU"):
        cfg.runtime(cuda_available=False)
    bf16_z0 = TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["precision=bf16", "zero.stage=0"])
    with pytest.raises(TrainConfigError, match="bf16 needs zero.stage >= 1"):
        bf16_z0.runtime(cuda_available=False)
    auto = TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["precision=auto", "device=auto"])
    assert auto.runtime(cuda_available=False) == ("cpu", "fp32")
    assert auto.runtime(cuda_available=True, bf16_supported=True) == ("cuda", "bf16")


def test_the_kuberay_job_runs_a_shipped_config_with_valid_commands():
    job = yaml.safe_load((REPO / "infra" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    script = shlex.split(job["spec"]["entrypoint"])
    assert script[:2] == ["bash", "-c"]
    commands = [shlex.split(part) for part in script[2].split("&&")]
    parser = build_parser()
    prepare, train = (parser.parse_args(c[1:]) for c in commands)
    assert prepare.data_command == "prepare" and train.ray
    cfg = TrainConfig.load(REPO / train.config, train.overrides)
    assert cfg.data.path == prepare.out
    cfg.accumulation(train.num_workers)  # the batch splits over the workers
    spec = job["spec"]["rayClusterSpec"]
    worker_cpus = sum(g["replicas"] * int(g["rayStartParams"]["num-cpus"]) for g in spec["workerGroupSpecs"])
    assert worker_cpus >= train.num_workers  # Ray Train asks 1 CPU per worker
    assert spec["rayVersion"] == __import__("ray").__version__


def test_the_hostfile_example_parses_into_ranks():
    assert _hostfile_slots(str(REPO / "infra" / "hostfile.example")) == 16
    cfg = TrainConfig.load(REPO / "infra" / "train-gpu-124m.yaml")
    assert cfg.accumulation(16) == 1  # the GPU config splits over the example's 16 ranks


def test_a_ray_address_where_nothing_listens_is_a_clear_error_not_a_hang(tmp_path):
    """Ray's own connect retries without end where no cluster listens (a warning every few seconds);
    `ctxmem train --ray --ray-address` checks that something answers first and says what to do."""
    data = tmp_path / "data"
    prepare(["chatterbot"], data, progress=False)  # the config's data is checked first
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "ctxmem", "train", "--config", str(REPO / "infra" / "train-ray-cpu.yaml"),
                           "--ray", "--num-workers", "1", "--ray-address", address, f"data.path={data}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode != 0
    assert f"no Ray cluster: nothing answers at {address}" in done.stderr and "ray start --head" in done.stderr


def test_only_host_port_addresses_are_probed_and_a_listener_counts_as_an_answer():
    assert unreachable("auto") is None and unreachable("local") is None  # Ray finds those itself
    port = free_port()
    assert unreachable(f"ray://127.0.0.1:{port}").startswith(f"no Ray cluster: nothing answers at ray://127.0.0.1:{port} (")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert unreachable(f"127.0.0.1:{listener.getsockname()[1]}") is None
