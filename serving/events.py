"""What the engine tells a request's consumer, in order: `Started`, then `Delta`s, then `Finished` -
or a single `Failed`. Plain frozen dataclasses: they cross the Ray boundary (engine replica -> ingress)
by pickle and the HTTP layer matches on their type."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Started:
    """The request was prefilled and joins the running batch."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV state came from the conversation cache
    queue_s: float  # seconds waiting in the engine queue
    cache: str | None  # "hit", "miss", or None when the request names no conversation
    prefill_steps: int = 1  # scheduler steps its prompt took (chunked prefill, interleaved with decode steps)


@dataclass(frozen=True)
class Delta:
    """New text. After `coalesce`, one Delta may carry several tokens."""

    text: str
    tokens: int
    batch: int  # sequences in the decode step (the largest, when coalesced)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    evicted_tokens: int  # tokens of this context the window no longer holds
    prefill_tokens: int  # prompt tokens run through the model (prompt - cached)
    # retrieve only (None under other policies): the evicted tokens put back while this reply was
    # generated (the union over its tokens' choices), as Recalled ranges in stream order
    recalled: tuple["Recalled", ...] | None = None

    @property
    def recalled_tokens(self) -> int:
        return sum(r.tokens for r in self.recalled or ())


@dataclass(frozen=True)
class Recalled:
    """A run of evicted tokens the retrieve policy put back: where it starts in the conversation's
    tokens (0 = the first prompt token), how many, and their text."""

    start: int
    tokens: int
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" or "length"
    usage: Usage
    cache: str | None
    batch_mean: float  # mean batch size over this request's decode steps


@dataclass(frozen=True)
class Failed:
    """An error for the client (see `errors.APIError.to_event`)."""

    status: int
    message: str
    error_type: str
    param: str | None = None
    code: str | None = None


Event = Union[Started, Delta, Finished, Failed]


class Texts:
    """Consecutive tokens of one stream gathered on the scheduler thread until their message goes out:
    `delta()` is the one Delta `coalesce` would make of them (text joined, tokens summed, the largest
    batch), built once per message instead of a Delta object per token. Never leaves the engine."""

    __slots__ = ("pieces", "tokens", "batch")

    def __init__(self, text: str, batch: int):
        self.pieces, self.tokens, self.batch = [text], 1, batch

    def add(self, text: str, batch: int) -> None:
        self.pieces.append(text)
        self.tokens += 1
        if batch > self.batch:
            self.batch = batch

    def has_text(self) -> bool:
        return any(self.pieces)

    def delta(self) -> Delta:
        return Delta("".join(self.pieces), self.tokens, self.batch)


FINAL = (Finished, Failed)  # the last event of every stream is one of these


def coalesce(events: list[Event]) -> list[Event]:
    """Consecutive deltas become one (text joined, tokens summed, the largest batch they ran in)."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Delta) and out and isinstance(out[-1], Delta):
            prev = out[-1]
            out[-1] = Delta(prev.text + ev.text, prev.tokens + ev.tokens, max(prev.batch, ev.batch))
        else:
            out.append(ev)
    return out
