"""The one generation loop of the project: prompts in, a stream of text deltas out.

Backend-agnostic: it sees logits as numpy and the cache only through ContextMemory, so the
PyTorch engine here and the ONNX Runtime engine in ctxmem.export run the same loop, sampler and
memory policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .memory import Backend, ContextMemory, ContextOverflowError, MemoryConfig, MemoryState
from .sampling import GenerationConfig, Sampler, sample_rows


@dataclass
class Delta:
    """What one sequence produced at one step."""

    row: int
    token_id: int
    text: str  # text that became final at this step (may be "" while a character or stop string is pending)
    finish_reason: str | None = None  # None while running, then "stop" or "length"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    evicted: int = 0  # tokens the memory policy evicted from this sequence's cache


class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts at the first full match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(h[0] for h in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0  # longest suffix of pending that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class SequenceDecoder:
    """Per-sequence generation state: sampler, detokenizer, stop rules, counts.

    The serving engine's continuous batcher drives these directly, one per request."""

    def __init__(self, tokenizer, config: GenerationConfig, prompt_ids: Sequence[int], row: int = 0):
        from .stream_decode import StreamDecoder

        self.row = row
        self.config = config
        self.sampler = Sampler(config)
        self.detok = StreamDecoder(tokenizer)
        self.stops = StopStringFilter(config.stop)
        self.stop_ids = set(config.stop_token_ids) if config.stop_token_ids is not None else set(tokenizer.stop_ids())
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None if config.max_new_tokens > 0 else "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: np.ndarray) -> Delta:
        """logits (V,) after the last fed token -> the next token and its final text."""
        history = self.prompt_ids + self.token_ids if self.config.repetition_penalty != 1.0 else None
        return self.accept(self.sampler(logits, history))

    def accept(self, token: int) -> Delta:
        """The token the sampler picked (step, or the batch's pick: `pick`) -> its final text."""
        if token in self.stop_ids:
            text, _ = self.stops.push(self.detok.flush())
            text += self.stops.flush()
            return self._emit(token, text, "stop")
        self.token_ids.append(token)
        text, stopped = self.stops.push(self.detok.push(token))
        if stopped:
            return self._emit(token, text, "stop")
        if len(self.token_ids) >= self.config.max_new_tokens:
            tail, _ = self.stops.push(self.detok.flush())
            return self._emit(token, text + tail + self.stops.flush(), "length")
        return self._emit(token, text, None)

    def _emit(self, token: int, text: str, reason: str | None) -> Delta:
        self.text += text
        self.finish_reason = reason
        return Delta(self.row, token, text, reason)


class Generator:
    """A backend + tokenizer + defaults: the engine behind `ctxmem generate` and the server."""

    def __init__(self, backend: Backend, tokenizer, memory: MemoryConfig = MemoryConfig(),
                 defaults: GenerationConfig | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.memory_config = memory
        self.defaults = defaults or GenerationConfig()
        ContextMemory(backend, memory)  # validate the policy against this model now, not mid-request

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:  # an empty prompt starts from the beginning-of-text token where there is one
            start = next((t for t in (self.tokenizer.bos_id, self.tokenizer.eos_id) if t is not None), None)
            if start is None:
                raise ValueError("the prompt is empty and this tokenizer has no BOS/EOS token to start from")
            ids = [start]
        bad = [i for i in ids if not 0 <= i < self.backend.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary of {self.backend.vocab_size}")
        return ids

    def stream(self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig | None = None,
               memory: MemoryConfig | None = None) -> Iterator[list[Delta]]:
        """Yields, at every decode step, the deltas of the sequences still running."""
        yield from self._run(prompts, config, memory, state_out=None)

    def generate(self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig | None = None,
                 memory: MemoryConfig | None = None) -> list[Completion]:
        holder: list[MemoryState] = []
        decoders: list[SequenceDecoder] = []
        for _ in self._run(prompts, config, memory, state_out=holder, decoders_out=decoders):
            pass
        state = holder[0]
        return [Completion(d.text, d.token_ids, d.finish_reason or "length", len(d.prompt_ids), len(d.token_ids),
                           int(state.evicted[d.row])) for d in decoders]

    def _run(self, prompts, config, memory_config, state_out=None, decoders_out=None):
        config = config or self.defaults
        memory = ContextMemory(self.backend, memory_config or self.memory_config)
        prompt_ids = [self.encode(p) for p in prompts]
        if memory.config.policy == "full":
            longest = max(memory.full_tokens_needed(p, config.max_new_tokens) for p in prompt_ids)
            if longest > memory.config.capacity:
                raise ContextOverflowError(
                    f"prompt ({max(len(p) for p in prompt_ids)} tokens) + max_new_tokens ({config.max_new_tokens}) "
                    f"exceeds the model's context of {memory.config.capacity} under the 'full' policy; shorten the "
                    "prompt or choose policy 'sink' or 'recompute' to keep going past the window")
        decoders = [SequenceDecoder(self.tokenizer, _with_seed(config, i), ids, row=i) for i, ids in enumerate(prompt_ids)]
        if decoders_out is not None:
            decoders_out.extend(decoders)
        state = memory.start(len(prompt_ids))
        if state_out is not None:
            state_out.append(state)
        if all(d.finished for d in decoders):
            return
        logits = memory.feed(state, prompt_ids)
        ahead: list = []  # greedy picks the memory made ahead (feed_greedy), one (B,) column per step
        while True:
            if len(ahead) > 1:  # fed already (the memory ran these steps): each running row takes its pick
                column = ahead.pop()
                deltas = [d.accept(column[d.row]) for d in decoders if not d.finished]
                if deltas:
                    yield deltas
                if all(d.finished for d in decoders):
                    return
                continue
            deltas, next_ids, valid = [], np.zeros((state.batch, 1), np.int64), np.zeros((state.batch, 1), bool)
            picks = ahead.pop() if ahead else pick(decoders, logits)  # a run's last pick: not fed yet
            for d in decoders:
                if d.finished:
                    continue
                delta = d.accept(picks[d.row]) if picks[d.row] >= 0 else d.step(logits[d.row])
                deltas.append(delta)
                if not d.finished:
                    next_ids[d.row, 0], valid[d.row, 0] = delta.token_id, True
            if deltas:
                yield deltas
            if not valid.any():
                return
            steps = _greedy_steps(decoders) if valid.all() else 0
            run = memory.feed_greedy(state, next_ids, steps) if steps > 1 else None
            if run is not None:
                # every row greedy: the next `steps` picks in one backend call (a row that stops on the way
                # has the rest of the run in its cache; it is never fed again)
                ahead = run.T.tolist()[::-1]  # Python ints, as pick gives (token ids reach JSON); popped from the end
                continue
            logits = memory.feed(state, next_ids, valid)


def pick(decoders: Sequence[SequenceDecoder | None], logits: np.ndarray) -> list[int]:
    """logits (B, V), row i for decoders[i] (None or finished: skipped) -> the batch's picks (`sample_rows`):
    row i's token, exactly what decoders[i].step(logits[i]) would sample, or -1 where the row must go
    through its own step. Both loops (Generator and the serving scheduler) take their tokens from here."""
    return sample_rows([None if d is None or d.finished else d.sampler for d in decoders], logits)


GREEDY_RUN = 64  # most decode steps one feed_greedy call runs: a stream's text comes in runs this long (64 measured
# 1.02-1.05x the tokens/s of 32 on the bench model; ~30 ms of text at a time at batch 1)


def _greedy_steps(decoders: Sequence[SequenceDecoder]) -> int:
    """How many decode steps may run ahead in one call (ContextMemory.feed_greedy): 0 unless every row
    picks by plain argmax (temperature 0, no repetition penalty - what the sampler's greedy path does
    alone), else as many as the row with the fewest tokens left may take, at most GREEDY_RUN."""
    if not all(d.config.temperature == 0 and d.config.repetition_penalty == 1.0 for d in decoders):
        return 0
    return min(GREEDY_RUN, min(d.config.max_new_tokens - len(d.token_ids) for d in decoders))


def _with_seed(config: GenerationConfig, row: int) -> GenerationConfig:
    """Each row of a batch gets its own random stream, derived from the request seed."""
    if config.seed is None or row == 0:
        return config
    from dataclasses import replace

    return replace(config, seed=config.seed + row)


def load_generator(ckpt_dir: str | Path, memory: MemoryConfig | None = None, device: str = "cpu") -> Generator:
    """A PyTorch Generator from a ctxmem checkpoint directory (defaults from generation_config.json)."""
    from .backend import TorchBackend
    from .checkpoint import TOKENIZER, load_generation_defaults, load_model
    from .tokenizer import load_tokenizer

    model = load_model(ckpt_dir, device=device)
    tokenizer = load_tokenizer(Path(ckpt_dir) / TOKENIZER)
    saved = load_generation_defaults(ckpt_dir)
    mem = memory or MemoryConfig(**saved.get("memory", {}))
    gen = GenerationConfig(**saved.get("generation", {}))
    return Generator(TorchBackend(model, device), tokenizer, mem, gen)
