#!/usr/bin/env python
"""Training throughput and ZeRO memory, side by side in one run (a benchmark, not a test).

    python bench/bench_train.py                       # CPU: tiny preset, 1 and 2 ranks
    python bench/bench_train.py --preset small --steps 6
    python bench/bench_train.py --gpu                 # + gpt-124m bf16 tokens/s and MFU on one GPU

Step times are the best of --steps (the minimum is the least disturbed by other load on shared
cores; the plain loop is timed before and after the DeepSpeed rows and the better one kept).
Rows, all on the same global batch of random tokens:
    plain      a PyTorch loop in one process (torch AdamW, the same model and grad clipping)
    ZeRO-s/N   DeepSpeed stage s on N ranks (engine built by ctxmem.training.zero.build_ds_config)
Time columns are fp32 (CPU-friendly). Memory columns come from bf16 engines (the ZeRO paper's
mixed-precision setting): the bytes of every distinct tensor storage the engine holds for
parameters, gradients and optimizer state on rank 0, measured after a backward pass, next to the
paper's 2Ψ + 2Ψ + 12Ψ divided per stage (ctxmem.training.zero.zero_state_bytes). Stage 0 has no
bf16 path in ctxmem, so its memory row is fp32 against 4Ψ + 4Ψ + 8Ψ.

Targets: ZeRO-2 on 2 ranks step time <= 1.2x the plain loop; ZeRO-3 per-rank state <= 1.1x 16Ψ/N.
The N-rank rows run under torchrun (this script re-launches itself with --worker).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on shared cores

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bf16 dense peak of common GPUs (FLOP/s), for MFU; --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12}


def bench_config(args, stage: int, precision: str, world: int, preset: str | None = None):
    from ctxmem.training.config import TrainConfig

    return TrainConfig.from_dict({
        "steps": 10**6, "precision": precision, "device": "cuda" if args.gpu_run else "cpu",
        "model": {"preset": preset or args.preset, "vocab_multiple": 64},
        "data": {"seq_len": args.seq_len},
        "batch": {"global_batch": args.global_batch, "micro_batch": args.global_batch // world},
        "optim": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0},
        "zero": {"stage": stage}, "tracking": {"enabled": False},
    })


def state_bytes(engine) -> int:
    """Bytes of the distinct storages behind parameters, gradients and optimizer state."""
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    def walk(obj, depth=0):
        if depth > 4 or isinstance(obj, (torch.nn.Module, str, bytes, int, float)):
            return
        if isinstance(obj, torch.Tensor):
            add(obj)
            if obj.grad is not None:
                add(obj.grad)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", p))  # ZeRO-3: the rank's partition, not the (empty) full view
        if p.grad is not None:
            add(p.grad)
    opt = engine.optimizer
    walk(vars(opt))
    base = getattr(opt, "optimizer", opt)
    walk(base.state)
    walk(base.param_groups)
    return sum(seen.values())


def time_engine(cfg, world: int, rank: int, steps: int, warmup: int, measure_memory: bool) -> dict:
    import deepspeed
    import torch
    import torch.nn.functional as F

    from ctxmem.model import Transformer
    from ctxmem.training.zero import build_ds_config

    torch.manual_seed(0)
    model_cfg = cfg.model.build(263)
    model = Transformer(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    device = "cuda" if cfg.device == "cuda" else "cpu"
    ds = build_ds_config(cfg, world, device, cfg.precision)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds,
                                      dist_init_required=False)
    gen = torch.Generator().manual_seed(rank)
    mem = 0
    times = []
    for step in range(warmup + steps):
        x = torch.randint(0, 263, (cfg.batch.micro_batch, cfg.seq_len + 1), generator=gen).to(engine.device)
        if device == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        logits = engine(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        engine.backward(loss)
        if measure_memory and step == warmup:
            mem = state_bytes(engine)
        engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    del engine, model
    gc.collect()
    return {"step_time": min(times), "n_params": n_params, "state_bytes": mem,
            "model_cfg": model_cfg}


def plain_loop(args, steps: int, warmup: int, device: str = "cpu", precision: str = "fp32", preset=None) -> dict:
    import torch
    import torch.nn.functional as F

    from ctxmem.model import Transformer

    cfg = bench_config(args, 0, "fp32", 1, preset)
    torch.manual_seed(0)
    model = Transformer(cfg.model.build(263)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        x = torch.randint(0, 263, (args.global_batch, cfg.seq_len + 1), generator=gen).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_time": min(times), "model_cfg": cfg.model.build(263),
            "n_params": sum(p.numel() for p in model.parameters())}


def run_stages(args, world: int, rank: int) -> list[dict]:
    """Every stage in fp32 (time) and bf16 (memory) on this process group."""
    rows = []
    for stage in (0, 1, 2, 3):
        r = time_engine(bench_config(args, stage, "fp32", world), world, rank, args.steps, args.warmup,
                        measure_memory=stage == 0)
        row = {"name": f"ZeRO-{stage}", "world": world, "stage": stage, "step_time": r["step_time"],
               "n_params": r["n_params"], "mem_precision": "fp32", "state_bytes": r["state_bytes"]}
        if stage >= 1:
            m = time_engine(bench_config(args, stage, "bf16", world), world, rank, 1, 1, measure_memory=True)
            row.update(mem_precision="bf16", state_bytes=m["state_bytes"])
        rows.append(row)
    return rows


def worker(args) -> None:
    """One rank under torchrun: all stages; rank 0 writes the rows."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rows = run_stages(args, world, rank)
    if rank == 0:
        Path(args.result).write_text(json.dumps(rows))


def one_rank(args) -> list[dict]:
    import deepspeed
    import deepspeed.comm

    from ctxmem.training.trainer import process_environment

    with process_environment(single=True):
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        try:
            return run_stages(args, 1, 0)
        finally:
            deepspeed.comm.destroy_process_group()


def n_ranks(args, n: int) -> list[dict]:
    from ctxmem.net import free_port

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker",
               "--result", str(result), "--preset", args.preset, "--seq-len", str(args.seq_len),
               "--global-batch", str(args.global_batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        return json.loads(result.read_text())


def mfu(args) -> None:
    """gpt-124m, bf16, one GPU: tokens/s and model FLOPs utilisation (PaLM's 6N + 12·L·T·d per token)."""
    import torch

    args.gpu_run = True
    args.seq_len, args.global_batch = args.gpu_seq_len, args.gpu_batch
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    plain = plain_loop(args, args.steps, args.warmup, device="cuda", precision="bf16", preset="gpt-124m")
    from ctxmem.training.trainer import process_environment

    import deepspeed
    import deepspeed.comm

    with process_environment(single=True):
        deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False, verbose=False)
        try:
            z = time_engine(bench_config(args, 1, "bf16", 1, "gpt-124m"), 1, 0, args.steps, args.warmup, False)
        finally:
            deepspeed.comm.destroy_process_group()
    c = z["model_cfg"]
    non_emb = z["n_params"] - c.vocab_size * c.d_model
    flops_per_token = 6 * non_emb + 12 * c.n_layers * args.seq_len * c.d_model
    tokens = args.global_batch * args.seq_len
    print(f"\nGPU: {name}; gpt-124m ({z['n_params'] / 1e6:.1f}M parameters), bf16, batch {args.global_batch} x "
          f"{args.seq_len} tokens")
    print(f"{'run':<22}{'step s':>9}{'tokens/s':>12}{'MFU':>8}")
    for label, t in (("plain (autocast bf16)", plain["step_time"]), ("DeepSpeed ZeRO-1 bf16", z["step_time"])):
        util = f"{tokens * flops_per_token / t / peak:.1%}" if peak else "n/a"
        print(f"{label:<22}{t:>9.3f}{tokens / t:>12,.0f}{util:>8}")
    if not peak:
        print(f"(no peak FLOP/s known for {name!r}: pass --peak-tflops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="also gpt-124m bf16 MFU on GPU 0")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU MFU section")
    parser.add_argument("--gpu-seq-len", type=int, default=1024)
    parser.add_argument("--gpu-batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gpu_run = False
    if args.worker:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return worker(args)
    if not args.gpu_only:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cpu_table(args)
    if args.gpu or args.gpu_only:
        import torch

        if not torch.cuda.is_available():
            print("\nno CUDA device: GPU MFU skipped")
        else:
            os.environ.pop("DS_ACCELERATOR", None)
            mfu(args)


def cpu_table(args) -> None:
    import torch

    from ctxmem.training.zero import zero_state_bytes

    print(f"CPU ({os.cpu_count()} cores); preset {args.preset}; global batch {args.global_batch} x {args.seq_len} "
          f"tokens; best of {args.steps} steps after {args.warmup} warm-up (the minimum: least disturbed by other load)", flush=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # 1-process rows use every core; N ranks get 1 thread each
    plain_loop(args, 3, 1)  # untimed: the first loop in a process pays for allocator and thread-pool start-up
    plain = plain_loop(args, args.steps, args.warmup)
    rows = one_rank(args) + (n_ranks(args, args.ranks) if args.ranks > 1 else [])
    again = plain_loop(args, args.steps, args.warmup)  # once more after the DeepSpeed rows: the better of the two
    plain = min(plain, again, key=lambda r: r["step_time"])
    psi = plain["n_params"]
    tokens = args.global_batch * args.seq_len
    print(f"Ψ = {psi:,} parameters\n")
    head = (f"{'run':<12}{'ranks':>6}{'step ms':>9}{'tokens/s':>10}{'x plain':>9}"
            f"{'state/rank MiB':>16}{'formula MiB':>13}{'measured/formula':>18}")
    print(head)
    print("-" * len(head))
    print(f"{'plain':<12}{1:>6}{plain['step_time'] * 1e3:>9.1f}{tokens / plain['step_time']:>10,.0f}{1.0:>9.2f}"
          f"{'':>16}{'':>13}{'':>18}")
    for r in rows:
        formula = zero_state_bytes(psi, r["stage"], r["world"], r["mem_precision"])["total"]
        ratio = r["state_bytes"] / formula if r["state_bytes"] else float("nan")
        print(f"{r['name']:<12}{r['world']:>6}{r['step_time'] * 1e3:>9.1f}{tokens / r['step_time']:>10,.0f}"
              f"{r['step_time'] / plain['step_time']:>9.2f}{r['state_bytes'] / 2**20:>12.2f} {r['mem_precision']:<3}"
              f"{formula / 2**20:>13.2f}{ratio:>18.2f}")
    z2 = next((r for r in rows if r["stage"] == 2 and r["world"] == args.ranks), None)
    z3 = next((r for r in rows if r["stage"] == 3 and r["world"] == args.ranks), None)
    if z2 and z3:
        t = z2["step_time"] / plain["step_time"]
        m = z3["state_bytes"] / zero_state_bytes(psi, 3, args.ranks, "bf16")["total"]
        print(f"\ntargets: ZeRO-2 on {args.ranks} ranks step time {t:.2f}x plain (target <= 1.2: "
              f"{'met' if t <= 1.2 else 'missed'}); ZeRO-3 state {m:.2f}x 16Ψ/N (target <= 1.1: "
              f"{'met' if m <= 1.1 else 'missed'})")


if __name__ == "__main__":
    main()
