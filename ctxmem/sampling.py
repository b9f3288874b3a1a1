"""Token sampling over float32 numpy logits, shared by the PyTorch and ONNX Runtime engines."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np


class GenerationConfigError(ValueError):
    pass


class NonFiniteLogitsError(ValueError):
    """Every logit of a row was NaN or infinite: the model produced nothing to pick from."""


_LOGIT_MAX = float(np.finfo(np.float64).max)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style (divide positive logits, multiply negative)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None  # None = the tokenizer's end tokens
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
        )
        for name, ok, what in checks:
            if not ok:
                raise GenerationConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")
        # numpy's generators take any integer >= 0 (a batch derives seed + row for its rows)
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                          and self.seed >= 0):
            raise GenerationConfigError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationConfigError("stop must be a list of non-empty strings")

    def with_overrides(self, **given) -> "GenerationConfig":
        """This config (usually an artifact's saved defaults) with the fields a caller set;
        ``None`` means "not set". The one override path: the CLI, the pyfunc and the server call it.
        Raises GenerationConfigError naming the field (validation re-runs on the result)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise GenerationConfigError(f"unknown generation settings {unknown}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in given.items() if v is not None})


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Sampler:
    """Picks the next token for one sequence; owns that sequence's random generator.

    Never overflows on valid settings: a tiny temperature or an extreme repetition penalty saturates
    instead of producing inf/NaN. Logits that are already non-finite (a broken model or backend) are
    handled deterministically: greedy over the finite values, or `NonFiniteLogitsError` when there
    are none."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | np.ndarray | None = None) -> int:
        """logits (V,) float32 -> token id."""
        cfg = self.config
        if cfg.temperature == 0 and (cfg.repetition_penalty == 1.0 or history is None or not len(history)):
            # greedy on the raw logits: argmax returns the first NaN or the first +inf when there is one,
            # so a finite pick means every value is finite or -inf - the slow path's answer too (it
            # argmaxes the same values in float64, exactly converted); otherwise it decides
            token = int(np.argmax(logits))
            if math.isfinite(logits[token]):
                return token
        logits = logits.astype(np.float64, copy=True)
        finite = np.isfinite(logits)
        if not finite.all():
            if not finite.any():
                raise NonFiniteLogitsError(f"all {logits.shape[0]} logits are NaN or infinite; the model "
                                           "produced no usable distribution for this sequence")
            return int(np.argmax(np.where(finite, logits, -np.inf)))
        with np.errstate(over="ignore", under="ignore"):
            if cfg.repetition_penalty != 1.0 and history is not None and len(history):
                seen = np.unique(np.asarray(history, dtype=np.int64))
                seen = seen[(seen >= 0) & (seen < logits.shape[0])]
                vals = logits[seen]
                logits[seen] = np.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
                np.clip(logits, -_LOGIT_MAX, _LOGIT_MAX, out=logits)  # an extreme penalty saturates, not inf
            if cfg.temperature == 0:
                return int(np.argmax(logits))
            # shift before dividing: every value is <= 0 (0 at the max), so a tiny temperature sends the
            # others to -inf (greedy in the limit) and never the max to +inf (inf - inf = NaN)
            # (in place on this call's float64 copy: the same operations, no temporaries)
            logits -= logits.max()
            logits /= cfg.temperature
            if cfg.top_k and cfg.top_k < logits.shape[0]:
                kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
                logits[logits < kth] = -np.inf
            probs = np.exp(logits, out=logits)  # the max is exp(0) = 1, so the sum is >= 1
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(cumulative, cfg.top_p)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        # the draw numpy's Generator.choice(V, p=probs) makes, without its per-call checks of p (built
        # here: finite, >= 0, summing to 1): the same cumulative sum, the same single uniform from this
        # generator, the same search - so a seed gives the same token as before, at a fraction of the cost
        cdf = np.cumsum(probs)  # (V,)
        cdf /= cdf[-1]
        return int(cdf.searchsorted(self.rng.random(), side="right"))
