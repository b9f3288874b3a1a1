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

    def export(self, past, idx: np.ndarray, stream: np.ndarray):
        """Keys are cached before rotation, so ``stream`` is not needed -> k, v (B, K, L, Hkv, D) numpy."""
        taken = self.take(past, idx)
        k = torch.stack([k for k, _ in taken], dim=1).permute(0, 3, 1, 2, 4)  # (B, L, Hkv, K, D) -> (B, K, L, Hkv, D)
        v = torch.stack([v for _, v in taken], dim=1).permute(0, 3, 1, 2, 4)
        return k.cpu().numpy(), v.cpu().numpy()

    def splice(self, past, idx: np.ndarray, start: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray):
        """take(idx) (fresh tensors), then slots [start, start + Z) set to k, v (B, Z, L, Hkv, D)."""
        taken = self.take(past, idx)
        device = past[0][0].device
        Z = k.shape[1]
        if Z:
            k_in = torch.from_numpy(np.ascontiguousarray(k.transpose(2, 0, 3, 1, 4))).to(device)  # (L, B, Hkv, Z, D)
            v_in = torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 3, 1, 4))).to(device)
            for i, (lk, lv) in enumerate(taken):
                lk[:, :, start:start + Z] = k_in[i]
                lv[:, :, start:start + Z] = v_in[i]
        return taken


class TorchBackend:
    """Runs a ctxmem Transformer eagerly; logits come back as float32 numpy for the shared sampler."""

    ops = TorchCacheOps()
    gives_queries = True  # forward_with_queries: the retrieve policy can run here

    def __init__(self, model: Transformer, device: str | torch.device | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.max_seq_len = model.cfg.max_seq_len
        self.n_layers = model.cfg.n_layers
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

    def forward_with_queries(self, ids, layout, past, last_only, layer: int):
        """forward, plus layer ``layer``'s queries of the new tokens before rotation (B, H, T, D)
        float32 numpy (the retrieve policy scores its store with them)."""
        seen = []
        hook = self.model.blocks[layer].attn.wq.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            logits, present = self.forward(ids, layout, past, last_only)
        finally:
            hook.remove()
        cfg = self.model.cfg
        B, T = ids.shape
        q = seen[-1].detach().float().view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        return logits, present, q.cpu().numpy()


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
