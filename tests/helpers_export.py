"""Shared builders for the export tests: a cheaply trained `small` checkpoint (the session fixtures
in fixtures_models.py build it), tampering helpers and a throwaway `mlflow server`."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ctxmem.net import free_port

REPO = Path(__file__).resolve().parents[1]


# ---- a trained `small` -------------------------------------------------------------------------------
_SUBJECTS = ("the cat", "a dog", "the sink", "my window", "the model", "a token", "the cache", "our memory")
_VERBS = ("keeps", "sees", "holds", "drops", "reads", "writes", "moves", "finds")
_OBJECTS = ("the first token", "a long story", "the last words", "every slot", "a small fish", "the key",
            "the value", "two more lines")


def synthetic_text(sentences: int, seed: int) -> str:
    """A tiny grammar: enough structure that a few dozen steps of training lower the loss a lot."""
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(sentences))


def train_small(out: Path, steps: int = 30, seq_len: int = 64, batch: int = 8) -> Path:
    """`small` preset, byte tokenizer, a plain torch loop (the DeepSpeed trainer is not needed here).
    Writes the checkpoint, val.txt beside it and an mlflow_run.json as the training stage does."""
    from ctxmem.backend import torch_threads

    with torch_threads(1):  # small matmuls: a second OpenMP thread only spins on a shared 2-core machine
        return _train_small(out, steps, seq_len, batch)


def _train_small(out: Path, steps: int, seq_len: int, batch: int) -> Path:
    import math

    import numpy as np
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.config import preset
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = Transformer(preset("small", vocab_size=tok.vocab_size))
    train = np.asarray(tok.encode(synthetic_text(3000, seed=1)), dtype=np.int64)
    val_text = synthetic_text(300, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # short warm-up, then constant
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 5)
        starts = rng.integers(0, len(train) - seq_len - 1, size=batch)
        rows = torch.from_numpy(np.stack([train[s:s + seq_len + 1] for s in starts]))
        logits = model(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    val = torch.tensor(tok.encode(val_text)[: 4 * seq_len + 1])
    with torch.no_grad():
        windows = torch.stack([val[i * seq_len: i * seq_len + seq_len + 1] for i in range(4)])
        logits = model(windows[:, :-1])
        val_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           windows[:, 1:].reshape(-1)))
    save_checkpoint(out, model, tok)
    (out / "mlflow_run.json").write_text(json.dumps({
        "run_id": "0123456789abcdef0123456789abcdef", "tracking_uri": "sqlite:///elsewhere/mlflow.db",
        "experiment": "ctxmem-train", "val_loss": val_loss, "val_ppl": math.exp(val_loss), "step": steps,
        "last_train_loss": float(loss.detach())}) + "\n")
    (out.parent / "val.txt").write_text(val_text + "\n")
    return out


# ---- MLflow stores -----------------------------------------------------------------------------------
def new_sqlite_store(template: Path, path: Path) -> str:
    """A fresh MLflow SQLite store at `path`, copied from the session's migrated empty store (the
    `mlflow_store_template` fixture) instead of migrated again; returns its sqlite:/// URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} exists: a new store needs a path of its own")
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


# ---- tampering ---------------------------------------------------------------------------------------
def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tamper_weights(export_dir: Path, delta: float = 0.05) -> str:
    """Add `delta` to the largest float initializer in model.onnx.data, in place; returns its name."""
    import numpy as np
    import onnx

    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    best = None
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and init.data_type == onnx.TensorProto.FLOAT:
            info = {e.key: e.value for e in init.external_data}
            if best is None or int(info["length"]) > int(best[1]["length"]):
                best = (init.name, info)
    name, info = best
    data = np.memmap(export_dir / info["location"], dtype=np.uint8, mode="r+")
    offset, length = int(info.get("offset", 0)), int(info["length"])
    values = data[offset: offset + length].view(np.float32)
    values += np.float32(delta)
    data.flush()
    return name


def cut_logits(export_dir: Path) -> None:
    """Rewrite the graph so `logits` loses its last vocabulary column: (B, T, V) -> (B, T, V-1)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits_full"
    vocab = graph.output[0].type.tensor_type.shape.dim[2].dim_value
    graph.initializer.extend([helper.make_tensor("cut_starts", onnx.TensorProto.INT64, [1], [0]),
                              helper.make_tensor("cut_ends", onnx.TensorProto.INT64, [1], [vocab - 1]),
                              helper.make_tensor("cut_axes", onnx.TensorProto.INT64, [1], [2])])
    graph.node.append(helper.make_node("Slice", ["logits_full", "cut_starts", "cut_ends", "cut_axes"], ["logits"]))
    graph.output[0].type.tensor_type.shape.dim[2].dim_value = vocab - 1
    onnx.save_model(model, str(export_dir / "model.onnx"))


# ---- a real `mlflow server` --------------------------------------------------------------------------
class MlflowServer:
    """infra/mlflow/start_server.sh on 127.0.0.1:<free port>, SQLite + local artifacts in `root`.
    `store_template`: a migrated empty store (the `mlflow_store_template` fixture) copied in as the
    server's SQLite file, so that the server starts without migrating a new one."""

    def __init__(self, root: Path, store_template: Path | None = None):
        root.mkdir(parents=True, exist_ok=True)
        if store_template is not None:
            new_sqlite_store(store_template, root / "mlflow.db")  # the script's default SQLite path
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no job runner for MLflow's GenAI jobs, which nothing
        # here uses - with it the server starts 8 more processes (a runner and 7 huey consumers), each
        # importing mlflow while the server does: 27 s of CPU to /health instead of 14.5 s, measured
        # (psutil, the server's process tree, 2026-11-30, busy 2-core machine)
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_HOST": "127.0.0.1",
               "MLFLOW_PORT": str(self.port), "MLFLOW_DIR": str(root), "MLFLOW_WORKERS": "1",
               "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
        self.proc = subprocess.Popen(["bash", str(REPO / "infra" / "mlflow" / "start_server.sh")], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 180.0) -> "MlflowServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
