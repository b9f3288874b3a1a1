"""The DeepSpeed config, built from the training config: parallelism is applied from outside, the
model never learns its ZeRO stage.

ZeRO (Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054) partitions across N data-parallel
ranks, for Ψ parameters trained with Adam in mixed precision:
    stage 0   nothing              2Ψ + 2Ψ + 12Ψ  = 16Ψ bytes per rank
    stage 1   optimizer state      2Ψ + 2Ψ + 12Ψ/N
    stage 2   + gradients          2Ψ + (2Ψ + 12Ψ)/N
    stage 3   + parameters         16Ψ/N
(fp32 training keeps 4-byte parameters and gradients: see `zero_state_bytes`.)
`zero_state_bytes` gives these numbers; bench/bench_train.py compares them with what it measures.
"""
from __future__ import annotations

from typing import Any

from .config import TrainConfig

QUIET = 10**9  # DeepSpeed prints every `steps_per_print` steps; ctxmem logs its own progress


def build_ds_config(cfg: TrainConfig, world_size: int, device: str, precision: str,
                    load_universal: bool = False) -> dict[str, Any]:
    """A DeepSpeed config dict for `cfg` on `world_size` ranks of `device` in `precision`.
    `load_universal`: the checkpoint to resume from is a universal one (written on another number
    of ranks and converted by `checkpoints.to_universal`)."""
    accum = cfg.accumulation(world_size)
    z = cfg.zero
    offloading = z.offload_optimizer or z.offload_params
    adam: dict[str, Any] = {
        "lr": cfg.optim.lr,  # the peak; the warmup-cosine schedule scales it every step
        "betas": list(cfg.optim.betas),
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,  # overridden per parameter group (no decay on norms)
    }
    if not (offloading and z.cpu_adam):
        # torch.optim.AdamW: no fused-Adam / CPUAdam JIT build (~2 min each) and the same update
        # math on every stage; DeepSpeed's CPUAdam is opt-in for large offloaded models.
        adam["torch_adam"] = True
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device == "cuda", reduce_bucket_size=5e7)
    if z.stage == 3:
        # gather small parameters whole instead of prefetching every tiny shard
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7)
    pin = device == "cuda"
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_batch,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed would otherwise clip at 1.0 silently
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000},
        "steps_per_print": QUIET,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if offloading and not z.cpu_adam:
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the offloaded fp32 partitions
    return ds


def zero_state_bytes(n_params: int, stage: int, world_size: int, precision: str = "bf16") -> dict[str, float]:
    """Bytes per rank of parameters, gradients and Adam state under ZeRO `stage` (paper, §5).

    bf16/fp16: 2Ψ parameters + 2Ψ gradients + KΨ optimizer state with K = 12 (fp32 master, momentum,
    variance). fp32: 4Ψ + 4Ψ, and K = 12 for stages 1-3 too (DeepSpeed's ZeRO optimizers keep a
    separate fp32 master partition even for fp32 parameters) but K = 8 at stage 0 (plain AdamW
    updates the parameters themselves)."""
    half = precision in ("bf16", "fp16")
    p_bytes = g_bytes = 2 if half else 4
    opt_bytes = 12 if (half or stage >= 1) else 8
    n = world_size
    params = n_params * p_bytes / (n if stage >= 3 else 1)
    grads = n_params * g_bytes / (n if stage >= 2 else 1)
    optim = n_params * opt_bytes / (n if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optim": optim, "total": params + grads + optim}
