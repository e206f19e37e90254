"""Model configuration: one dataclass for the GPT-2 and Llama families, and presets.

`config_from_preset("nano", n_layer=2)` builds a preset with fields overridden;
unknown presets or fields raise a one-line `ValueError` that lists the valid
choices, and inconsistent shapes (heads not dividing the width, ...) raise a
`ValueError` saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

FAMILIES = ("gpt2", "llama")
ATTENTION_IMPLS = ("flash", "xla", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")

# Fields that change how a model computes but not what its parameters are:
# a checkpoint may be loaded with different values of these.
RUNTIME_FIELDS = ("attention", "dtype", "remat")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyperparameters.

    family "gpt2": learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    family "llama": RoPE, RMSNorm, SwiGLU MLP, no biases, grouped-query attention.
    """

    family: str = "gpt2"
    vocab_size: int = 50257
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    d_ff: int | None = None  # None: 4 * d_model (gpt2) or ~8/3 * d_model rounded (llama)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None  # None: the family's default (True for both)
    use_bias: bool | None = None  # None: True for gpt2, False for llama
    # Sliding-window attention (Mistral): a query sees the last `sliding_window`
    # positions, itself included (Hugging Face's convention). None: full causal.
    sliding_window: int | None = None
    init_std: float = 0.02
    attention: str = "auto"  # "flash" | "xla" | "cudnn" | "auto"
    dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision)
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block's activations in the backward pass

    def __post_init__(self):
        validate_config(self)

    # Derived quantities -------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        hidden = int(8 * self.d_model / 3)
        return ((hidden + 63) // 64) * 64

    @property
    def tied(self) -> bool:
        return True if self.tie_embeddings is None else bool(self.tie_embeddings)

    @property
    def bias(self) -> bool:
        if self.use_bias is None:
            return self.family == "gpt2"
        return bool(self.use_bias)

    # Serialisation --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        _check_fields(d)
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides) -> "ModelConfig":
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def param_count(self) -> int:
        """Number of parameters, computed from the shapes (no model built)."""
        d, f, hd = self.d_model, self.ffn_dim, self.head_dim
        b = self.bias
        attn = d * (self.n_head * hd) + 2 * d * (self.kv_heads * hd) + self.n_head * hd * d
        if b:
            attn += self.n_head * hd + 2 * self.kv_heads * hd + d
        if self.family == "gpt2":
            mlp = 2 * d * f + ((f + d) if b else 0)
            norms = 2 * (2 * d)  # LayerNorm scale + bias, twice
        else:
            mlp = 3 * d * f + ((2 * f + d) if b else 0)
            norms = 2 * d
        per_layer = attn + mlp + norms
        emb = self.vocab_size * d
        total = self.n_layer * per_layer + emb + (2 * d if self.family == "gpt2" else d)
        if self.family == "gpt2":
            total += self.max_seq_len * d
        if not self.tied:
            total += emb
        return total


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _check_fields(d: dict[str, Any]) -> None:
    valid = field_names()
    for key in d:
        if key not in valid:
            raise ValueError(f"unknown config field {key!r}; valid fields: {', '.join(valid)}")


def validate_config(c: ModelConfig) -> None:
    if c.family not in FAMILIES:
        raise ValueError(f"unknown family {c.family!r}; valid families: {', '.join(FAMILIES)}")
    if c.attention not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention {c.attention!r}; valid choices: {', '.join(ATTENTION_IMPLS)}"
        )
    for name in ("dtype", "param_dtype"):
        value = getattr(c, name)
        if value not in DTYPES:
            raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(DTYPES)}")
    for name in ("vocab_size", "n_layer", "d_model", "n_head", "max_seq_len"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
    for name in ("n_kv_head", "d_ff", "sliding_window"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"config field {name} must be a positive integer or None, got {value!r}")
    if c.d_model % c.n_head:
        raise ValueError(
            f"n_head={c.n_head} does not divide d_model={c.d_model} (the width must be a multiple of the heads)"
        )
    if c.n_head % c.kv_heads:
        raise ValueError(
            f"n_kv_head={c.kv_heads} does not divide n_head={c.n_head} (grouped-query attention needs whole groups)"
        )
    if c.family == "llama" and c.head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {c.head_dim} (d_model={c.d_model}, n_head={c.n_head})")


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized GPT-2 style model: trains in minutes on two cores.
    "nano": dict(
        family="gpt2", vocab_size=2048, n_layer=4, d_model=128, n_head=4,
        max_seq_len=256,
    ),
    # CPU-sized Llama style model with grouped-query attention.
    "llama-nano": dict(
        family="llama", vocab_size=2048, n_layer=4, d_model=128, n_head=4, n_kv_head=2,
        d_ff=352, max_seq_len=256,
    ),
    # GPT-2 small (124M).
    "gpt2": dict(
        family="gpt2", vocab_size=50257, n_layer=12, d_model=768, n_head=12,
        max_seq_len=1024,
    ),
    # ~1B Llama style (Llama-3.2-1B shapes with a 32k vocabulary, tied embeddings).
    "llama-1b": dict(
        family="llama", vocab_size=32000, n_layer=16, d_model=2048, n_head=32, n_kv_head=8,
        d_ff=8192, max_seq_len=2048, rope_theta=500000.0,
    ),
    # ~7B Llama style (Mistral-7B shapes: 32 layers, width 4096, 32 query / 8 KV heads),
    # for GPU benchmarks with random weights; untied output head as in those models.
    "llama-7b": dict(
        family="llama", vocab_size=32000, n_layer=32, d_model=4096, n_head=32, n_kv_head=8,
        d_ff=14336, max_seq_len=4096, rope_theta=1000000.0, tie_embeddings=False,
    ),
}


def config_from_preset(name: str, **overrides) -> ModelConfig:
    """The preset `name` with any fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    _check_fields(overrides)
    return ModelConfig(**{**PRESETS[name], **overrides})


def _parse_scalar(text: str, tp) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_scalar(text, inner[0])
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["n_layer=2", "attention=xla"] -> {"n_layer": 2, "attention": "xla"}, typed by the field."""
    hints = typing.get_type_hints(ModelConfig)
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, _, text = item.partition("=")
        key = key.strip().replace("-", "_")
        _check_fields({key: None})
        try:
            out[key] = _parse_scalar(text.strip(), hints[key])
        except ValueError as e:
            raise ValueError(f"bad value for config field {key}: {e}") from None
    return out


def config_diff(a: ModelConfig, b: ModelConfig, ignore=RUNTIME_FIELDS) -> list[str]:
    """Fields (other than `ignore`) where the two configs differ, as 'name=a vs b'."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in ignore:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{f.name}={va!r} vs {vb!r}")
    return out
