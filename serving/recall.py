"""What the retrieve policy put back for one reply, for the response's `usage.recalled`.

Under `retrieve` (ctxmem.retrieval) the blocks put back between the sinks and the window are chosen
afresh before every token past the window; `StreamStore.chosen` holds the current choice as (block
id, tokens) pairs. A reply's "recalled" tokens are the union of the choices its tokens were computed
with: the last prompt token's (whose logits give the first reply token) and each decode step's. They
are copied out when noted, since a long reply may see the store's ring drop a block it used.
"""
from __future__ import annotations

import numpy as np

from .events import Recalled


class RecallLog:
    """One sequence's put-back blocks. ``offset``: the stream prefix tokens (sink token, BOS) that
    ContextMemory put before the conversation's first token, so ranges start at conversation indices."""

    def __init__(self, offset: int):
        self.offset = offset
        self.blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block id -> stream indices (n,), ids (n,)
        self._last: tuple = ()

    def note(self, store) -> None:
        """After a forward: the blocks ``store`` (a StreamStore, or None: nothing evicted yet) had put back."""
        if store is None or store.chosen == self._last:
            return
        self._last = store.chosen
        for block, size in store.chosen:
            held = self.blocks.get(block)
            if held is None or size > len(held[0]):  # a block still filling may have grown
                stream, _, _, ids = store.gather([(block, size)])
                self.blocks[block] = (stream, ids)

    def ranges(self, decode) -> tuple[Recalled, ...]:
        """The noted tokens as runs of consecutive stream indices, each with its text (decode: ids -> str)."""
        if not self.blocks:
            return ()
        stream = np.concatenate([self.blocks[b][0] for b in sorted(self.blocks)])
        ids = np.concatenate([self.blocks[b][1] for b in sorted(self.blocks)])
        cuts = np.flatnonzero(np.diff(stream) != 1) + 1
        return tuple(Recalled(int(t[0]) - self.offset, len(t), decode(i.tolist()))
                     for t, i in zip(np.split(stream, cuts), np.split(ids, cuts)))
