"""The PyTorch backend of the memory/generation loop (ONNX Runtime has its own in ctxmem.export)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .model import Transformer


class TorchCacheOps:
    """CacheOps over per-layer (k, v) torch tensors (B, Hkv, S, D)."""

    def take(self, past, idx: np.ndarray):
        index = torch.from_numpy(np.ascontiguousarray(idx)).to(past[0][0].device)
        B, H, _, D = past[0][0].shape
        gather = index[:, None, :, None].expand(B, H, index.shape[1], D)
        return [(k.gather(2, gather), v.gather(2, gather)) for k, v in past]

    def select(self, past, rows: np.ndarray):
        index = torch.from_numpy(np.ascontiguousarray(rows)).to(past[0][0].device)
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]

    def concat(self, pasts):
        return [(torch.cat([p[i][0] for p in pasts]), torch.cat([p[i][1] for p in pasts])) for i in range(len(pasts[0]))]


class TorchBackend:
    """Runs a ctxmem Transformer eagerly; logits come back as float32 numpy for the shared sampler."""

    ops = TorchCacheOps()

    def __init__(self, model: Transformer, device: str | torch.device | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.max_seq_len = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        self.uses_rope = model.cfg.pos == "rope"
        self.sink_token_id = model.cfg.sink_token_id
        self.stream_prefix = model.cfg.stream_prefix  # [sink token] [BOS]: ContextMemory starts every stream with it
        self.name = f"torch-{self.device.type}"

    @torch.inference_mode()
    def forward(self, ids, layout, past, last_only=True):
        """ids (B, T) int64 numpy; layout: ctxmem.layout.AttentionLayout; past None or per-layer (k, v)."""
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        layout = layout.trimmed()
        logits, present = self.model(t(ids), positions=t(layout.positions), past=past, use_cache=True,
                                     key_positions=t(layout.key_positions), allowed=t(layout.allowed),
                                     sink_positions=t(layout.sink_positions), sink_keys=t(layout.sink_keys))
        if last_only:
            logits = logits[:, -1]
        return logits.float().cpu().numpy(), present


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` intra-op threads, restored afterwards. Decode-sized matmuls gain
    nothing from more threads, and spinning OpenMP threads starve a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
