"""Typed model configuration: one dataclass that validates, derives and round-trips to config.json.

Presets name the sizes the project uses (tests, CPU training, GPU training, the seed article's
Transformer); `ModelConfig.from_hf_llama` reads any Hugging Face Llama-family config.json.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NORMS = ("layernorm", "rmsnorm")
FFNS = ("relu", "gelu", "swiglu")
POSITIONS = ("rope", "learned")
# How the model holds attention sinks (StreamingLLM section 3.3; gpt-oss): none = whatever token
# starts a stream; token = one dedicated learnable token, the last id of the vocabulary, that
# begins every training sequence and every stream at inference; learned = a learned logit per head
# added to the softmax denominator (attention may rest on "nothing").
SINKS = ("none", "token", "learned")


class ConfigError(ValueError):
    """A configuration that cannot describe a working model; the message says what to change."""


@dataclass
class ModelConfig:
    vocab_size: int = 264
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head); fewer = grouped-query attention
    d_ff: int | None = None  # None = 4*d_model (relu/gelu) or the Llama 8/3 rule rounded (swiglu)
    max_seq_len: int = 256  # the model's context window: the most tokens one attention sees
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    ffn: str = "swiglu"
    pos: str = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False  # biases in the attention/FFN projections (the seed article has them)
    dropout: float = 0.0
    sink: str = "none"  # see SINKS
    # the BOS id every training sample began with (data.samples=document); None = samples were random
    # crops, so no stream starts with a fixed token besides the sink token. See stream_prefix.
    bos_token_id: int | None = None
    preset: str = "custom"
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}: each head needs "
                f"d_model/n_heads dimensions; pick n_heads among the divisors of {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among a whole group)")
        self.head_dim = self.d_model // self.n_heads
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        for name, allowed in (("norm", NORMS), ("ffn", FFNS), ("pos", POSITIONS), ("sink", SINKS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.bos_token_id is not None and (
                not isinstance(self.bos_token_id, int) or isinstance(self.bos_token_id, bool)
                or not 0 <= self.bos_token_id < self.vocab_size or self.bos_token_id == self.sink_token_id):
            raise ConfigError(f"bos_token_id must be an id of the vocabulary (0..{self.vocab_size - 1}) other than "
                              f"the sink token, or None, got {self.bos_token_id!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_ff is None:
            if self.ffn == "swiglu":  # Llama: 2/3 of 4*d, rounded up to a multiple of 32
                self.d_ff = 32 * -(-(8 * self.d_model // 3) // 32)
            else:
                self.d_ff = 4 * self.d_model

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("head_dim")
        if data["bos_token_id"] is None:  # written only when set: a crop-trained config stays as it was
            data.pop("bos_token_id")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known - {"head_dim", "format"})
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "ctxmem", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a ctxmem checkpoint needs config.json") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err})") from None
        if data.get("format") != "ctxmem" and "model_type" in data:
            raise ConfigError(f"{path} is a Hugging Face config; convert it with `ctxmem import-hf`")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    @property
    def sink_token_id(self) -> int | None:
        """sink='token': the id of the dedicated sink token (the vocabulary's last); else None."""
        return self.vocab_size - 1 if self.sink == "token" else None

    @property
    def stream_prefix(self) -> tuple[int, ...]:
        """The tokens every training sample began with, so every stream at inference begins with them
        too (ContextMemory prepends them): the sink token (sink='token'), then BOS (bos_token_id)."""
        return tuple(t for t in (self.sink_token_id, self.bos_token_id) if t is not None)

    def num_params(self) -> int:
        d, f, kv = self.d_model, self.d_ff, self.n_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2
        ffn = d * f * (3 if self.ffn == "swiglu" else 2)
        norms = 2 * d * (2 if self.norm == "layernorm" else 1)
        bias = (2 * d + 2 * kv + f * (2 if self.ffn == "swiglu" else 1) + d) if self.bias else 0
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * d if self.pos == "learned" else 0
        final_norm = d * (2 if self.norm == "layernorm" else 1)
        head_sinks = self.n_heads if self.sink == "learned" else 0
        return self.n_layers * (attn + ffn + norms + bias + head_sinks) + emb + pos + final_norm

    # ---- Hugging Face Llama family --------------------------------------------------------
    @classmethod
    def from_hf_llama(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"model_type={model_type!r} is not a Llama-family model (llama, mistral, qwen2)")
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"rope_scaling {scaling} is not supported; only plain RoPE imports exactly")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("attention_bias/mlp_bias Llama variants are not supported")
        rope = hf.get("rope_theta")
        if rope is None:  # transformers >= 5 nests it in rope_parameters
            rope = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r}: Llama SwiGLU uses silu")
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), ffn="swiglu", pos="rope",
            rope_theta=float(rope), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bias=False, dropout=0.0, preset="llama",
        )

    def to_hf_llama(self) -> dict[str, Any]:
        if (self.norm, self.ffn, self.pos, self.bias) != ("rmsnorm", "swiglu", "rope", False):
            raise ConfigError("only rmsnorm + swiglu + rope models without biases map onto Llama")
        if self.sink == "learned":
            raise ConfigError("sink='learned' adds a learned logit per head to the softmax, which "
                              "LlamaForCausalLM has no place for; export this model with `ctxmem export` (ONNX)")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.d_ff,
            "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "head_dim": self.head_dim, "torch_dtype": "float32",
        }


# Named presets. vocab_size is a default: training sets it from the tokenizer it trains with.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed article's Transformer (embedding, multi-head scaled dot-product attention with Wᴼ,
    # GELU FFN, dropout, LayerNorm, output layer), made decoder-only and given RoPE positions so
    # the sink window applies to it.
    "seed": dict(d_model=256, n_layers=4, n_heads=8, ffn="gelu", norm="layernorm", bias=True,
                 dropout=0.1, max_seq_len=256, tie_embeddings=True),
    # A few hundred thousand parameters: unit tests and CI.
    "tiny": dict(d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, d_ff=256),
    # ~10M parameters: trains on a laptop CPU in minutes.
    "small": dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256, d_ff=1024),
    # GPT-2 124M class, modern blocks: the GPU size.
    "gpt-124m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                     d_ff=2048, ffn="swiglu", norm="rmsnorm"),
    # Llama-family layout (GQA, untied, SwiGLU, RMSNorm); real checkpoints come from import-hf.
    "llama": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=512,
                  tie_embeddings=False, norm_eps=1e-6, rope_theta=500000.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional overrides, e.g. preset("tiny", vocab_size=300)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], "preset": name, **overrides})
