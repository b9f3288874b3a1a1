"""DeepSpeed training end to end on CPU: ZeRO parity across ranks, bit-exact resume, the
consolidated checkpoint, bf16 and offload, MLflow, signals, bad input.

Expensive runs are module fixtures shared by the tests that read them. All runs use the `tiny`
preset on the embedded chatterbot corpus, 32-token windows and 8 steps (infra/train-tiny.yaml).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from ctxmem.checkpoint import load_model
from ctxmem.cli import main
from ctxmem.training.config import TrainConfig
from ctxmem.training.data import prepare
from helpers_export import new_sqlite_store
from helpers_training import REPO, ctxmem, losses, metrics, one_thread, summary, train_inprocess, tree_state

# 1 process vs 2 ranks, fp32: the same samples and the same math, but the gradient of the global
# mean is summed in a different order (micro-batch accumulation vs an all-reduce across ranks),
# so the weights differ by float32 rounding (~1e-7 relative per step) that compounds over steps.
# Measured: <= 2e-7 after 8 steps. 1e-5 bounds it with room and still catches any real
# difference (a wrong sample, scale or clip changes the loss at 1e-3 or more).
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "data"
    prepare(["chatterbot"], out, progress=False)
    return out


@pytest.fixture(scope="module")
def mlflow_uri(mlflow_store_template, tmp_path_factory):
    return new_sqlite_store(mlflow_store_template, tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def one_process_z2(chat_data, tmp_path_factory, mlflow_uri):
    """1 process, ZeRO-2, fp32, MLflow on: the reference run (checkpoints at steps 4 and 8)."""
    out = tmp_path_factory.mktemp("z2") / "run"
    result = train_inprocess(out, chat_data, "zero.stage=2", "tracking.enabled=true", f"tracking.uri={mlflow_uri}")
    return out, result


@pytest.fixture(scope="module")
def one_process_z3(chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("z3") / "run"
    return out, train_inprocess(out, chat_data, "zero.stage=3")


def _two_ranks(chat_data, tmp_path_factory, stage):
    out = tmp_path_factory.mktemp(f"ranks{stage}") / "run"
    proc = ctxmem("train", "--config", "infra/train-tiny.yaml", "--nproc", "2", f"data.path={chat_data}",
                  f"out={out}", f"zero.stage={stage}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def two_ranks_z2(chat_data, tmp_path_factory):
    return _two_ranks(chat_data, tmp_path_factory, 2)


@pytest.fixture(scope="module")
def two_ranks_z3(chat_data, tmp_path_factory):
    return _two_ranks(chat_data, tmp_path_factory, 3)


def _assert_same_losses(a, b, atol):
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    worst = max(abs(la[s] - lb[s]) for s in la)
    assert worst <= atol, f"per-step losses differ by {worst:.3g} > {atol}"


# ---- 1. ZeRO ranks vs one process ------------------------------------------------------------------
@pytest.mark.slow
def test_zero2_on_two_cpu_ranks_matches_one_process(one_process_z2, two_ranks_z2):
    _assert_same_losses(one_process_z2[0], two_ranks_z2[0], PARITY_ATOL)
    s = summary(two_ranks_z2[0])
    assert s["world_size"] == 2 and s["launcher"] == "local" and s["engine"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert "global batch 8 = 2 x 2 ranks x 2 accumulation" in two_ranks_z2[1].stderr


@pytest.mark.slow
def test_zero3_on_two_cpu_ranks_matches_one_process(one_process_z3, two_ranks_z3):
    _assert_same_losses(one_process_z3[0], two_ranks_z3[0], PARITY_ATOL)
    assert summary(two_ranks_z3[0])["engine"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"


@pytest.mark.slow
def test_zero2_and_zero3_in_one_process_train_the_same_model(one_process_z2, one_process_z3):
    _assert_same_losses(one_process_z2[0], one_process_z3[0], PARITY_ATOL)


# ---- 2. resume -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_is_bit_identical(one_process_z2, chat_data, tmp_path):
    ref, _ = one_process_z2
    mid = ref / "checkpoints" / "step_0000004"
    assert (mid / "ctxmem_state.json").exists()
    out = tmp_path / "resumed"
    result = train_inprocess(out, chat_data, "zero.stage=2", resume=str(mid))
    assert result.status == "completed" and result.step == 8
    full, resumed = losses(ref), losses(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == full[s] for s in resumed)  # exact: atol 0
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val == [r["val_loss"] for r in metrics(ref) if r.get("step") == 8 and "val_loss" in r]



@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process(two_ranks_z2, one_process_z2, chat_data, tmp_path, capsys):
    # ZeRO-2's optimizer partitions of 2 ranks, resharded for 1 (DeepSpeed universal checkpoint).
    # Not bit-exact, for the reason 1 process and 2 ranks differ at all (PARITY_ATOL): the same
    # samples, weights and Adam moments, but the gradient sums run in another order. The other
    # direction (ZeRO-3, 1 -> 2 ranks) runs in test_training_readme.py.
    ref, _ = two_ranks_z2
    out = tmp_path / "on-one"
    result = train_inprocess(out, chat_data, "zero.stage=2", resume=str(ref / "checkpoints" / "step_0000004"))
    assert result.status == "completed" and summary(out)["world_size"] == 1
    assert "resuming after step 4 (resharded from 2 rank(s)" in capsys.readouterr().err
    assert not (out / "checkpoints" / "universal").exists()  # the converted copy, removed once loaded
    resumed = losses(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    for run in (ref, one_process_z2[0]):  # the 2-rank run it continues, and 1 process throughout
        worst = max(abs(resumed[s] - losses(run)[s]) for s in resumed)
        assert worst <= PARITY_ATOL, f"per-step losses differ by {worst:.3g} > {PARITY_ATOL}"
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # as in the ZeRO-3 consolidation test


@pytest.mark.slow
def test_the_logged_learning_rate_is_the_one_the_optimizer_used(one_process_z2, chat_data, tmp_path):
    ref, _ = one_process_z2
    optim = TrainConfig.load(ref / "config.yaml").optim
    ref_lr = {r["step"]: r["lr"] for r in metrics(ref) if "lr" in r}
    assert [ref_lr[s] for s in range(1, 9)] == pytest.approx([optim.lr_at(s, 8) for s in range(8)])
    # Resumed with more steps: the first step runs on the rate the checkpoint's scheduler had set
    # (the 8-step cosine), the steps after it on the 12-step cosine; the log says so.
    out = tmp_path / "longer"
    train_inprocess(out, chat_data, "zero.stage=2", "steps=12", resume=str(ref / "checkpoints" / "step_0000004"))
    lr, ls = {r["step"]: r["lr"] for r in metrics(out) if "lr" in r}, losses(out)
    assert lr[5] == ref_lr[5] != pytest.approx(optim.lr_at(4, 12))
    assert ls[6] == losses(ref)[6]  # step 5 really updated with the 8-step rate: the same weights after it
    assert [lr[s] for s in range(6, 13)] == pytest.approx([optim.lr_at(s - 1, 12) for s in range(6, 13)])


@pytest.mark.slow
def test_each_micro_batch_of_a_step_draws_its_own_dropout(chat_data, tmp_path, monkeypatch):
    import torch.nn.functional as F

    dropped = []  # zero patterns of every training-time dropout call, in call order
    original = F.dropout

    def recording(input, p=0.5, training=True, inplace=False):
        out = original(input, p, training, inplace)
        if training and p > 0:
            dropped.append(out == 0)
        return out
    monkeypatch.setattr(F, "dropout", recording)
    # 1 process, global batch 8 = micro-batch 2 x 4 micro-steps
    train_inprocess(tmp_path / "run", chat_data, "model.overrides.dropout=0.5", "steps=1", "optim.warmup_steps=1")
    per_micro_step = len(dropped) // 4
    assert per_micro_step > 0 and len(dropped) == 4 * per_micro_step
    first = [dropped[m * per_micro_step] for m in range(4)]  # the embedding dropout of each micro-step
    assert all(not torch.equal(first[0], other) for other in first[1:])

# ---- 3. the consolidated checkpoint ------------------------------------------------------------------
@pytest.mark.slow
def test_the_zero3_checkpoint_consolidates_to_the_live_weights_and_generates(two_ranks_z3, one_process_z3, capsys):
    out, _ = two_ranks_z3
    final = out / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "mlflow_run.json", "train_config.yaml"} <= \
        {p.name for p in final.iterdir()}
    # equal to the weights the two ranks held, gathered from their ZeRO-3 partitions at the end
    assert summary(out)["consolidated_max_abs_diff"] == 0.0
    model = load_model(final)
    ref = load_model(one_process_z3[0] / "final")
    worst = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert worst < 1e-4  # the parity tolerance, carried into 8 Adam updates of the weights
    assert main(["generate", "--model", str(final), "--prompt", "Hello", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n")  # 8 steps of training: the text itself is not judged


@pytest.mark.slow
def test_every_stage_writes_a_loadable_fp32_checkpoint(one_process_z2, chat_data, tmp_path):
    out = tmp_path / "z0"
    train_inprocess(out, chat_data, "zero.stage=0", "steps=2")
    for run in (out, one_process_z2[0]):
        assert summary(run)["consolidated_max_abs_diff"] == 0.0
        assert next(load_model(run / "final").parameters()).dtype == torch.float32


# ---- 4. bf16 and offload ------------------------------------------------------------------------------
def _trains(out) -> bool:
    ls = [losses(out)[s] for s in sorted(losses(out))]
    return sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 - 0.5


@pytest.mark.slow
def test_a_bf16_run_trains(chat_data, tmp_path):
    out = tmp_path / "bf16"
    result = train_inprocess(out, chat_data, "precision=bf16", "zero.stage=1", "steps=16")
    assert result.status == "completed" and _trains(out)
    s = summary(out)
    assert s["precision"] == "bf16" and s["engine"]["param_dtype"] == "bfloat16"
    # the final checkpoint holds the fp32 master weights, not the bf16 copies
    assert 0 < s["consolidated_max_abs_diff"] < 1e-2
    assert next(load_model(out / "final").parameters()).dtype == torch.float32


@pytest.mark.slow
def test_an_offload_run_with_activation_checkpointing_trains(chat_data, tmp_path):
    out = tmp_path / "offload"
    result = train_inprocess(out, chat_data, "zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true",
                             "activation_checkpointing=true", "steps=16")
    assert result.status == "completed" and _trains(out)
    engine = summary(out)["engine"]
    assert engine["offload_optimizer"] and engine["offload_params"] and engine["activation_checkpointing"]
    assert summary(out)["consolidated_max_abs_diff"] == 0.0


# ---- 5. Ray Train ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_train_with_two_cpu_workers_writes_the_same_checkpoint(chat_data, one_process_z2, tmp_path, capsys):
    import ray

    # Ray's own session folder (short: its socket paths must fit in 107 bytes), a local instance on
    # loopback (conftest sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and a capped object store.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             _temp_dir=ray_tmp, configure_logging=False)
    try:
        out = tmp_path / "run"
        # the shipped Ray config, shortened to the reference run's settings
        rc = main(["train", "--config", "infra/train-ray-cpu.yaml", "--ray", "--num-workers", "2",
                   f"data.path={chat_data}", f"out={out}", "tracking.enabled=false", "steps=8", "data.seq_len=32",
                   "batch.global_batch=8", "batch.micro_batch=2", "optim.warmup_steps=2", "eval.interval=4",
                   "eval.samples=16", "checkpoint.interval=4"])
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    reported = json.loads(printed[-1])  # the metrics rank 0 reported to Ray Train
    assert reported["status"] == "completed" and reported["step"] == 8
    s = summary(out)
    assert s["launcher"] == "ray" and s["world_size"] == 2 and s["consolidated_max_abs_diff"] == 0.0
    assert {p.name for p in (out / "final").iterdir()} == {p.name for p in (one_process_z2[0] / "final").iterdir()}
    load_model(out / "final")
    # the Ray run is the reference config on 2 workers: the same losses as one process
    _assert_same_losses(one_process_z2[0], out, PARITY_ATOL)
    assert list((out / "ray").rglob("model.safetensors"))  # the checkpoint Ray Train persisted


# ---- 6. MLflow ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_mlflow_store_holds_params_metrics_tags_and_artifacts(one_process_z2, mlflow_uri):
    from mlflow import MlflowClient

    out, result = one_process_z2
    run_file = json.loads((out / "final" / "mlflow_run.json").read_text())
    assert run_file["run_id"] == result.mlflow["run_id"] and run_file["tracking_uri"] == mlflow_uri
    assert run_file["val_loss"] == pytest.approx(result.val_loss) and run_file["val_ppl"] > 1
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_file["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["zero.stage"] == "2" and p["optim.lr"] == "0.003" and p["model.preset"] == "tiny"
    assert p["batch.grad_accum_resolved"] == "4" and p["model_config.d_model"] == "96"
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [4, 8]
    t = run.data.tags
    assert t["world_size"] == "1" and t["zero_stage"] == "2" and t["device"] == "cpu" and len(t["git_commit"]) >= 7
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "metrics.jsonl", "checkpoint"} <= top
    ckpt = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/tokenizer.json"} <= ckpt


@pytest.mark.slow
def test_an_unreachable_tracking_server_loses_nothing(chat_data, tmp_path, mlflow_uri, caplog):
    from mlflow import MlflowClient

    from ctxmem.net import free_port

    out = tmp_path / "offline"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = train_inprocess(out, chat_data, "steps=4", "tracking.enabled=true", f"tracking.uri={down}")
    assert result.status == "completed" and result.mlflow["pending"]
    assert "unreachable" in caplog.text and "--sync-mlflow" in caplog.text
    assert (out / "mlflow_pending.jsonl").exists()
    assert main(["train", "--sync-mlflow", str(out), "--tracking-uri", mlflow_uri]) == 0
    run_id = json.loads((out / "final" / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "4"
    assert len(MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")) == 4
    assert not (out / "mlflow_pending.jsonl").exists()


# ---- signals ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(chat_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ctxmem.cli", "train", "--config", "infra/train-tiny.yaml", f"data.path={chat_data}",
           f"out={out}", "steps=100000", "checkpoint.interval=100000", "eval.interval=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    s = summary(out)
    assert s["status"] == "interrupted" and s["step"] >= 3
    assert f"resume with: ctxmem train --config {out / 'config.yaml'} --resume" in err
    assert (out / "checkpoints" / f"step_{s['step']:07d}" / "ctxmem_state.json").exists()
    # and it does resume, in place, from the config it wrote (in this process: one launch is enough)
    from ctxmem.training.trainer import train

    with one_thread():
        done = train(TrainConfig.load(out / "config.yaml", [f"steps={s['step'] + 2}"]), "auto", progress=False)
    assert done.status == "completed" and summary(out)["status"] == "completed"
    assert sorted(losses(out)) == list(range(1, s["step"] + 3))


# ---- 7. bad input ------------------------------------------------------------------------------------------
def _train_cli(*args):
    return main(["train", "--config", str(REPO / "infra" / "train-tiny.yaml"), *args])


def test_an_unknown_preset_is_refused_before_anything_runs(chat_data, tmp_path, capsys):
    assert _train_cli(f"data.path={chat_data}", f"out={tmp_path / 'o'}", "model.preset=gpt-5") == 1
    err = capsys.readouterr().err
    assert "unknown preset 'gpt-5'" in err and "tiny" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(chat_data, tmp_path, capsys):
    assert _train_cli(f"data.path={chat_data}", f"out={tmp_path / 'o'}", "batch.global_batch=6", "--nproc", "2") == 1
    assert "not divisible by world size 2 x batch.micro_batch=2 = 4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_prepared_data_is_refused(tmp_path, capsys):
    assert _train_cli(f"data.path={tmp_path / 'nodata'}", f"out={tmp_path / 'o'}") == 1
    err = capsys.readouterr().err
    assert "not a prepared data folder" in err and "ctxmem data prepare" in err


@pytest.mark.slow
def test_a_corrupt_checkpoint_on_resume_is_refused_and_nothing_is_overwritten(one_process_z2, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_process_z2[0], out)
    optim = next((out / "checkpoints" / "step_0000008").glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    optim.write_bytes(bytes(data))
    before = tree_state(out)
    assert _train_cli(f"data.path={chat_data}", f"out={out}", "steps=12", "--resume") == 1
    err = capsys.readouterr().err
    assert "optim_states.pt is corrupt (its sha256 differs" in err and "step_0000004" in err
    assert tree_state(out) == before
    # an interrupted save (no manifest) is refused too, naming the earlier checkpoint
    (out / "checkpoints" / "step_0000008" / "ctxmem_state.json").unlink()
    assert _train_cli(f"data.path={chat_data}", f"out={out}", "steps=12", "--resume") == 1
    assert "is incomplete" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fresh_run_does_not_overwrite_existing_checkpoints(one_process_z2, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_process_z2[0], out)
    before = tree_state(out)
    assert _train_cli(f"data.path={chat_data}", f"out={out}") == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert tree_state(out) == before


@pytest.mark.slow
def test_the_cpu_demo_config_runs(chat_data, tmp_path):
    # the demo's own settings, shortened: 3 steps instead of 1000, no MLflow store in the repo
    out = tmp_path / "demo"
    result = train_inprocess(out, chat_data, "steps=3", "optim.warmup_steps=1", "eval.interval=3", "eval.samples=16",
                             "tracking.enabled=false", config=REPO / "infra" / "train-cpu-demo.yaml")
    assert result.status == "completed" and load_model(out / "final").cfg.preset == "tiny"
