"""Hugging Face checkpoints: load and save GPT-2 and Llama/Mistral models.

    from flashjax.models import from_pretrained, save_pretrained

    model, tokenizer = from_pretrained("path/to/hf-model")   # local directory
    logits = model(tokens)                                  # [batch, seq] ints -> [batch, seq, vocab] f32
    save_pretrained(model, "out/dir", tokenizer)            # opens in transformers

`from_pretrained(path, *, dtype=None, attention="auto", max_seq_len=None)`
returns a tuple `(model, tokenizer)`: the NNX `GPT` and a `PretrainedTokenizer`
built from the directory's `tokenizer.json` (None when there is none). The
tokenizer is returned beside the model rather than attached to it because NNX
keeps every attribute of a module in its graph definition.

Supported architectures (`config.json`'s "architectures"):
  GPT2LMHeadModel                      family "gpt2" (Conv1D weights are [in, out];
                                       c_attn is already our fused q|k|v)
  LlamaForCausalLM, MistralForCausalLM family "llama" (q/k/v_proj fused into wqkv,
                                       gate/up_proj into w_in; GQA; RMSNorm;
                                       rope_theta; tied or separate lm_head;
                                       Mistral's sliding_window)
HF's Llama weights are already in the rotate-half RoPE layout that
`flashjax.models.gpt.apply_rope` uses, so no permutation is applied.

Weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`.
The safetensors format is read here directly (header parsed, tensors memory-
mapped), so bf16 works without torch and the `safetensors` package is not needed.
Loading goes shard by shard; each tensor is converted straight into a host
buffer of the target dtype (fused q|k|v and gate|up are assembled there), moved
to the device, and dropped, so peak memory stays near one copy of the model in
the target dtype plus one layer's largest tensor (a bf16 checkpoint is never
expanded to fp32 unless dtype="float32" is asked for).

dtype: "bfloat16"/"bf16", "float16"/"fp16", "float32"/"fp32"; None means the
checkpoint's "torch_dtype" (or "dtype"), float32 when it names none. Parameters
and compute both use it; logits are float32.

Mistral's sliding window becomes `ModelConfig.sliding_window` when it is smaller
than the model's context (max_seq_len); the model then passes it to
`flash_attention(window=...)`. A window at least as long as the context changes
nothing and is dropped (logged).

Errors: a missing config.json / weight file / shard raises FileNotFoundError
naming the file; an unsupported architecture or option, a missing tensor or a
tensor of the wrong shape raises ValueError naming the tensor and its file.

Chat: when `tokenizer_config.json` (or `chat_template.jinja`) has a
`chat_template`, `tokenizer.apply_chat_template(messages)` renders it with
jinja2 (`pip install jinja2`, part of the [hf] extra).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger("flashjax.models")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}


# ---------------------------------------------------------------------------
# safetensors (read and write; the format is an 8-byte little-endian header
# length, a JSON header {name: {dtype, shape, data_offsets}}, then the data)
# ---------------------------------------------------------------------------

def _st_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    table = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
        "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    return {k: np.dtype(v) for k, v in table.items()}


def _st_code(dtype) -> str:
    dt = np.dtype(dtype)
    for code, d in _st_dtypes().items():
        if d == dt:
            return code
    raise ValueError(f"dtype {dt} cannot be written to safetensors")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: its header, and tensors as read-only memory-mapped numpy views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weight file {self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"{self.path} is not a safetensors file (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path} is not a safetensors file (bad JSON header: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path} is not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        dtypes = _st_dtypes()
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                code, shape, (b, e) = entry["dtype"], tuple(int(x) for x in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: malformed header entry for tensor {name!r}: {entry!r}") from None
            if code not in dtypes:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
            dt = dtypes[code]
            nbytes = math.prod(shape) * dt.itemsize
            if e - b != nbytes or b < 0 or data_start + e > size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} ({code} {list(shape)}) has data offsets [{b}, {e}) that do not "
                    f"fit its shape ({nbytes} bytes) or the file (truncated?)"
                )
            self.tensors[name] = TensorInfo(name, dt, shape, data_start + b, data_start + e)
        self._mm: np.memmap | None = None

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the file (no copy)."""
        info = self.tensors.get(name)
        if info is None:
            raise ValueError(f"tensor {name!r} is not in {self.path}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[info.begin : info.end]
        return raw.view(info.dtype).reshape(info.shape)

    def close(self):
        self._mm = None


def write_safetensors(path: str | Path, tensors: Sequence[tuple[str, tuple, Any, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` [(name, shape, dtype, make_array)] to `path`, one array in memory at a time.

    The file is written beside `path` and renamed into place.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_code(dtype), "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype, make in tensors:
            arr = np.ascontiguousarray(make(), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.tobytes())
            del arr
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def normalize_dtype(dtype) -> str:
    """'bf16' / jnp.bfloat16 / 'bfloat16' ... -> 'bfloat16' (one of float32, bfloat16, float16)."""
    name = getattr(dtype, "name", None) or getattr(getattr(dtype, "dtype", None), "name", None) or str(dtype)
    name = name.replace("torch.", "").lower()
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r}; valid choices: float32, bfloat16, float16")
    return _DTYPE_ALIASES[name]


def hf_architecture(hf: dict, config_path: Path | str = CONFIG_FILE) -> str:
    """The supported architecture named by an HF config ('GPT2LMHeadModel', ...), or a ValueError."""
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf["model_type"]]]
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    named = ", ".join(map(str, archs)) or f"model_type {hf.get('model_type')!r}"
    raise ValueError(
        f"{config_path}: unsupported architecture {named}; supported: {', '.join(ARCHITECTURES)}"
    )


def _checkpoint_dtype(hf: dict) -> str:
    raw = hf.get("dtype") or hf.get("torch_dtype")
    if raw is None:
        return "float32"
    try:
        return normalize_dtype(raw)
    except ValueError:
        log.warning("checkpoint dtype %r is not float32/bfloat16/float16; loading as float32", raw)
        return "float32"


def _rope_theta(hf: dict, config_path) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if kind not in (None, "default"):
        raise ValueError(
            f"{config_path}: RoPE scaling {kind!r} (rope_scaling / rope_parameters) is not supported; "
            "only the default RoPE is"
        )
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else hf.get("rope_theta", 10000.0))


def config_from_hf(hf: dict, *, dtype=None, attention: str = "auto", max_seq_len: int | None = None,
                   config_path: Path | str = CONFIG_FILE):
    """The ModelConfig for a Hugging Face config dict (raises ValueError on anything unsupported)."""
    from flashjax.models.config import ModelConfig

    arch = hf_architecture(hf, config_path)
    dt = _checkpoint_dtype(hf) if dtype is None else normalize_dtype(dtype)

    def need(key):
        if key not in hf or hf[key] is None:
            raise ValueError(f"{config_path}: missing field {key!r} for {arch}")
        return hf[key]

    def unsupported(what):
        raise ValueError(f"{config_path}: {what} is not supported for {arch}")

    if ARCHITECTURES[arch] == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            unsupported(f"activation_function {act!r} (only the tanh GELU, gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            unsupported("scale_attn_by_inverse_layer_idx=true")
        if hf.get("scale_attn_weights") is False:
            unsupported("scale_attn_weights=false")
        if hf.get("add_cross_attention"):
            unsupported("add_cross_attention=true")
        n_pos = int(need("n_positions"))
        fields = dict(
            family="gpt2", vocab_size=int(need("vocab_size")), n_layer=int(need("n_layer")),
            d_model=int(need("n_embd")), n_head=int(need("n_head")), n_kv_head=None,
            d_ff=int(hf["n_inner"]) if hf.get("n_inner") else None,
            max_seq_len=n_pos, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
        )
        if max_seq_len is not None and max_seq_len > n_pos:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the checkpoint's n_positions={n_pos} (learned positions)")
    else:
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            unsupported(f"hidden_act {act!r} (only silu)")
        d, h = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = hf.get("head_dim")
        if head_dim is not None and d % h == 0 and int(head_dim) != d // h:
            unsupported(f"head_dim={head_dim} different from hidden_size / num_attention_heads = {d // h}")
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            unsupported(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (both must match)")
        fields = dict(
            family="llama", vocab_size=int(need("vocab_size")), n_layer=int(need("num_hidden_layers")),
            d_model=d, n_head=h, n_kv_head=int(hf.get("num_key_value_heads") or h),
            d_ff=int(need("intermediate_size")), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=_rope_theta(hf, config_path), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=attn_bias,
        )
    if max_seq_len is not None:
        fields["max_seq_len"] = int(max_seq_len)
    if isinstance(hf.get("initializer_range"), (int, float)):
        fields["init_std"] = float(hf["initializer_range"])
    window = hf.get("sliding_window") if ARCHITECTURES[arch] == "mistral" else None
    if window is not None and hf.get("use_sliding_window", True) is not False:
        window = int(window)
        if window < fields["max_seq_len"]:
            fields["sliding_window"] = window
        else:
            log.info("sliding_window=%d >= context %d: full causal attention (the window never binds)",
                     window, fields["max_seq_len"])
    try:
        return ModelConfig(**fields, attention=attention, dtype=dt, param_dtype=dt)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None


def config_to_hf(config, *, dtype: str | None = None, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """The Hugging Face config.json dict for a ModelConfig (GPT2LMHeadModel, LlamaForCausalLM or MistralForCausalLM)."""
    c = config
    dt = normalize_dtype(dtype or c.param_dtype)
    common = {"vocab_size": c.vocab_size, "initializer_range": c.init_std, "tie_word_embeddings": c.tied,
              "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dt, "dtype": dt, "use_cache": True}
    if c.family == "gpt2":
        if not c.bias:
            raise ValueError("a gpt2-family model without biases has no Hugging Face GPT2LMHeadModel equivalent")
        if c.kv_heads != c.n_head:
            raise ValueError("a gpt2-family model with grouped-query attention has no GPT2LMHeadModel equivalent")
        if c.sliding_window is not None:
            raise ValueError("a gpt2-family model with a sliding window has no GPT2LMHeadModel equivalent")
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": c.ffn_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        }
    arch, model_type = ("LlamaForCausalLM", "llama")
    if c.sliding_window is not None:
        if c.bias:
            raise ValueError("a model with both biases and a sliding window has no Hugging Face equivalent "
                             "(MistralForCausalLM has no biases)")
        arch, model_type = ("MistralForCausalLM", "mistral")
    out = {
        "architectures": [arch], "model_type": model_type, **common,
        "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_dropout": 0.0,
    }
    if model_type == "llama":
        out.update(attention_bias=c.bias, mlp_bias=c.bias, pretraining_tp=1)
    else:
        out.update(sliding_window=c.sliding_window)
    return out


# ---------------------------------------------------------------------------
# Weight mapping: our parameter path <- pieces of HF tensors
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """HF tensor `name` (shape `hf_shape`) fills columns `cols` (last axis) of our parameter `path`.

    `transpose`: the HF tensor is a torch Linear weight [out, in] (ours is [in, out]).
    `rows`: only the first `rows` rows of the HF tensor are used (GPT-2 positions).
    """

    name: str
    hf_shape: tuple[int, ...]
    path: tuple
    cols: tuple[int, int] | None = None
    transpose: bool = False
    rows: int | None = None


def _weight_plan(c, *, gpt2_prefix: str = "transformer.", hf_positions: int | None = None) -> list[Piece]:
    """The HF tensors of the model with config `c`, and where each goes in our parameters."""
    d, f, hd = c.d_model, c.ffn_dim, c.head_dim
    qw, kw = c.n_head * hd, c.kv_heads * hd
    plan: list[Piece] = []
    add = plan.append
    if c.family == "gpt2":
        p = gpt2_prefix
        add(Piece(f"{p}wte.weight", (c.vocab_size, d), ("wte",)))
        n_pos = hf_positions or c.max_seq_len
        add(Piece(f"{p}wpe.weight", (n_pos, d), ("wpe",), rows=c.max_seq_len if n_pos != c.max_seq_len else None))
        for i in range(c.n_layer):
            h, b = f"{p}h.{i}.", ("blocks", i)
            for hf_norm, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
                add(Piece(f"{h}{hf_norm}.weight", (d,), b + (ours, "scale")))
                add(Piece(f"{h}{hf_norm}.bias", (d,), b + (ours, "bias")))
            for hf_lin, ours, shape in (("attn.c_attn", ("attn", "wqkv"), (d, qw + 2 * kw)),
                                        ("attn.c_proj", ("attn", "wo"), (qw, d)),
                                        ("mlp.c_fc", ("mlp", "w_in"), (d, f)),
                                        ("mlp.c_proj", ("mlp", "w_out"), (f, d))):
                add(Piece(f"{h}{hf_lin}.weight", shape, b + ours + ("kernel",)))
                add(Piece(f"{h}{hf_lin}.bias", shape[-1:], b + ours + ("bias",)))
        add(Piece(f"{p}ln_f.weight", (d,), ("norm_f", "scale")))
        add(Piece(f"{p}ln_f.bias", (d,), ("norm_f", "bias")))
        if not c.tied:
            add(Piece("lm_head.weight", (c.vocab_size, d), ("lm_head",), transpose=True))
        return plan
    add(Piece("model.embed_tokens.weight", (c.vocab_size, d), ("wte",)))
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.", ("blocks", i)
        add(Piece(f"{h}input_layernorm.weight", (d,), b + ("norm1", "scale")))
        add(Piece(f"{h}post_attention_layernorm.weight", (d,), b + ("norm2", "scale")))
        groups = (
            (("attn", "wqkv"), [("self_attn.q_proj", qw), ("self_attn.k_proj", kw), ("self_attn.v_proj", kw)], d),
            (("attn", "wo"), [("self_attn.o_proj", d)], qw),
            (("mlp", "w_in"), [("mlp.gate_proj", f), ("mlp.up_proj", f)], d),
            (("mlp", "w_out"), [("mlp.down_proj", d)], f),
        )
        for ours, parts, d_in in groups:
            start = 0
            for hf_lin, width in parts:
                cols = (start, start + width) if len(parts) > 1 else None
                add(Piece(f"{h}{hf_lin}.weight", (width, d_in), b + ours + ("kernel",), cols=cols, transpose=True))
                if c.bias:
                    add(Piece(f"{h}{hf_lin}.bias", (width,), b + ours + ("bias",), cols=cols))
                start += width
    add(Piece("model.norm.weight", (d,), ("norm_f", "scale")))
    if not c.tied:
        add(Piece("lm_head.weight", (c.vocab_size, d), ("lm_head",), transpose=True))
    return plan


# Tensors a checkpoint may hold that the model does not need.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def looks_like_hf_dir(path: str | Path) -> bool:
    """True when `path` is a directory whose config.json is a Hugging Face model config."""
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not cfg.is_file() or (p / "state").is_dir():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        # A damaged config.json next to safetensors weights: still an HF directory, so that
        # loading it says what is wrong with config.json (not "no checkpoint found").
        return any(p.glob("*.safetensors")) or (p / INDEX_FILE).is_file()
    return "architectures" in data or "model_type" in data


def _weight_files(root: Path) -> tuple[dict[str, Path] | None, list[Path], Path]:
    """(weight_map or None, files, what) for the directory: the index's map, or the single/all safetensors files."""
    index = root / INDEX_FILE
    if index.is_file():
        data = _read_json(index, "index")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index} has no weight_map")
        files = {}
        for fname in dict.fromkeys(wm.values()):
            fp = root / fname
            if not fp.is_file():
                raise FileNotFoundError(f"shard {fp} listed in {index} does not exist")
            files[fname] = fp
        return {k: files[v] for k, v in wm.items()}, list(files.values()), index
    single = root / WEIGHTS_FILE
    if single.is_file():
        return None, [single], single
    found = sorted(root.glob("model*.safetensors"))
    if found:
        return None, found, root
    others = [n for n in ("pytorch_model.bin", "model.pt", "consolidated.safetensors") if (root / n).exists()]
    hint = f" (found {', '.join(others)}: only Hugging Face safetensors weights are supported)" if others else ""
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {root}{hint}")


def load_state(root: str | Path, config, *, hf_positions: int | None = None):
    """Read the weights of the HF directory `root` into the NNX model for `config`; returns the model."""
    import jax
    from flax import nnx

    from flashjax.models.gpt import abstract_model

    root = Path(root)
    weight_map, files, where = _weight_files(root)
    opened = {fp: SafetensorsFile(fp) for fp in files}
    try:
        if weight_map is None:
            weight_map = {}
            for fp, st in opened.items():
                for name in st.tensors:
                    weight_map.setdefault(name, fp)
        prefix = "transformer."
        if config.family == "gpt2" and "transformer.wte.weight" not in weight_map and "wte.weight" in weight_map:
            prefix = ""  # the original GPT-2 checkpoints have no "transformer." prefix
        plan = _weight_plan(config, gpt2_prefix=prefix, hf_positions=hf_positions)

        # Check names and shapes first (headers only), so a bad checkpoint fails before any big read.
        for pc in plan:
            fp = weight_map.get(pc.name)
            if fp is None:
                raise ValueError(f"tensor {pc.name!r} is missing from {where}")
            info = opened[fp].tensors.get(pc.name)
            if info is None:
                raise ValueError(f"tensor {pc.name!r} is missing from {fp} (listed there by {where})")
            if info.shape != pc.hf_shape:
                raise ValueError(
                    f"tensor {pc.name!r} in {fp} has shape {list(info.shape)}, expected {list(pc.hf_shape)} "
                    f"for this config ({root / CONFIG_FILE})"
                )
        used = {pc.name for pc in plan}
        extra = [n for n in weight_map if n not in used and not _IGNORED.search(n)
                 and not (config.tied and n == "lm_head.weight")]
        if extra:
            log.warning("%s: %d tensors not used by the model, e.g. %s", where, len(extra), ", ".join(extra[:5]))

        graphdef, abstract = nnx.split(abstract_model(config))
        flat = list(nnx.to_flat_state(abstract))
        targets = {path: var.get_value() for path, var in flat}
        for pc in plan:
            if pc.path not in targets:
                raise AssertionError(f"no parameter {pc.path} in the model")  # a plan bug, not user input
        pending: dict[tuple, int] = {}
        transposed: dict[tuple, bool] = {}
        for pc in plan:
            pending[pc.path] = pending.get(pc.path, 0) + 1
            if transposed.setdefault(pc.path, pc.transpose) != pc.transpose:
                raise AssertionError(f"{pc.path}: mixed transposed and plain pieces")
        buffers: dict[tuple, np.ndarray] = {}
        loaded: dict[tuple, Any] = {}
        by_file: dict[Path, list[Piece]] = {}
        for pc in plan:
            by_file.setdefault(weight_map[pc.name], []).append(pc)
        to_device = jax.jit(lambda x: x.T)
        for fp in files:  # shard by shard
            st = opened[fp]
            for pc in by_file.get(fp, []):
                t = targets[pc.path]
                buf = buffers.get(pc.path)
                if buf is None:
                    # Transposed parameters are assembled in the checkpoint's [out, in] layout
                    # (plain row copies) and transposed on the device.
                    shape = tuple(t.shape)[::-1] if pc.transpose else tuple(t.shape)
                    buf = buffers[pc.path] = np.empty(shape, np.dtype(t.dtype))
                src = st.get(pc.name)
                if pc.rows is not None:
                    src = src[: pc.rows]
                if pc.cols is None:
                    dst = buf
                elif pc.transpose:
                    dst = buf[pc.cols[0] : pc.cols[1]]
                else:
                    dst = buf[..., pc.cols[0] : pc.cols[1]]
                if dst.shape != src.shape:
                    raise AssertionError(f"{pc.name}: {src.shape} does not fit {pc.path} {dst.shape}")
                dst[...] = src  # converts to the target dtype on the way (no full-precision copy)
                del src, dst
                pending[pc.path] -= 1
                if pending[pc.path] == 0:
                    arr = jax.device_put(buffers.pop(pc.path))
                    loaded[pc.path] = to_device(arr) if pc.transpose else arr
                    del arr
            st.close()
        missing = [p for p in targets if p not in loaded]
        if missing:
            raise AssertionError(f"parameters not filled: {missing}")
        state = nnx.from_flat_state([(path, var.replace(loaded[path])) for path, var in flat])
        return nnx.merge(graphdef, state)
    finally:
        for st in opened.values():
            st.close()


def from_pretrained(path: str | Path, *, dtype=None, attention: str = "auto", max_seq_len: int | None = None):
    """(model, tokenizer) from a local Hugging Face model directory.

    model: `flashjax.models.GPT`; `model(tokens [batch, seq]) -> logits [batch, seq, vocab]` (float32).
    tokenizer: `PretrainedTokenizer` from the directory's tokenizer.json, or None if it has none.
    dtype: parameter and compute dtype (default: the checkpoint's torch_dtype).
    attention: "flash" | "xla" | "cudnn" | "auto".
    max_seq_len: the context the model is configured for (default: the checkpoint's
      max_position_embeddings / n_positions); caps KV caches that size themselves by it.
    """
    model, tokenizer, _ = load_pretrained(path, dtype=dtype, attention=attention, max_seq_len=max_seq_len)
    return model, tokenizer


def load_pretrained(path: str | Path, *, dtype=None, attention: str | None = "auto", max_seq_len: int | None = None):
    """(model, tokenizer or None, ModelConfig): `from_pretrained` plus the config (for `load_model`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    config_path = root / CONFIG_FILE
    hf = _read_json(config_path, "model config")
    config = config_from_hf(hf, dtype=dtype, attention=attention or "auto", max_seq_len=max_seq_len,
                            config_path=config_path)
    hf_positions = int(hf["n_positions"]) if config.family == "gpt2" else None
    model = load_state(root, config, hf_positions=hf_positions)
    tokenizer = PretrainedTokenizer.from_dir(root, model_config=hf) if (root / TOKENIZER_FILE).is_file() else None
    if tokenizer is None:
        log.info("%s has no %s: no tokenizer loaded", root, TOKENIZER_FILE)
    return model, tokenizer, config


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def save_pretrained(model, path: str | Path, tokenizer=None, *, dtype=None) -> Path:
    """Write `model` as a Hugging Face model directory (config.json, model.safetensors,
    generation_config.json, and tokenizer.json + tokenizer_config.json with `tokenizer`).

    `transformers.AutoModelForCausalLM.from_pretrained(path)` opens it: GPT2LMHeadModel
    for the gpt2 family, LlamaForCausalLM for llama (MistralForCausalLM with a sliding
    window). `tokenizer`: a flashjax `Tokenizer` or a `PretrainedTokenizer`.
    `dtype`: the dtype of the saved weights (default: the model's param_dtype).
    """
    from flax import nnx

    c = model.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dt = normalize_dtype(dtype or c.param_dtype)
    bos_id = eos_id = None
    if tokenizer is not None:
        eos_id = getattr(tokenizer, "eot_id", None)
        bos_id = getattr(tokenizer, "bos_id", None)
        bos_id = eos_id if bos_id is None else bos_id
    hf = config_to_hf(c, dtype=dt, bos_id=bos_id, eos_id=eos_id)

    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import jax.numpy as jnp

    np_dt = np.dtype(jnp.dtype(dt))
    params = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    plan = _weight_plan(c)

    def maker(pc: Piece):
        def make():
            arr = params[pc.path]
            if pc.cols is not None:
                arr = arr[..., pc.cols[0] : pc.cols[1]]
            arr = np.asarray(arr)
            if pc.transpose:
                arr = arr.T
            return arr.astype(np_dt, copy=False)
        return make

    write_safetensors(out / WEIGHTS_FILE, [(pc.name, pc.hf_shape, np_dt, maker(pc)) for pc in plan],
                      metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id)) if v is not None}
    (out / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    stale = out / INDEX_FILE
    if stale.exists():  # a sharded save from before would shadow model.safetensors
        stale.unlink()
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out, max_len=c.max_seq_len)
    return out


def _save_tokenizer(tokenizer, out: Path, *, max_len: int) -> None:
    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer.save(out)
        return
    tokenizer.save(out / TOKENIZER_FILE)  # flashjax.models.Tokenizer
    from flashjax.models.tokenizer import EOT

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "clean_up_tokenization_spaces": False,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class PretrainedTokenizer:
    """A Hugging Face `tokenizer.json` with the interface of `flashjax.models.Tokenizer`.

    encode(text) -> ids (with the tokenizer's own special tokens, e.g. Llama's BOS),
    decode(ids) -> text, stream_decoder() for incremental text, eot_id (the end-of-
    sequence id; stop_ids lists all of them), bos_id, vocab_size, chat_template and
    apply_chat_template(messages).
    """

    def __init__(self, hf_tokenizer, *, eos_ids: Sequence[int] = (), bos_id: int | None = None,
                 chat_template: str | None = None, special: dict[str, str] | None = None,
                 config: dict | None = None, source: str | None = None):
        self.hf = hf_tokenizer
        self.stop_ids = list(eos_ids)
        self.eot_id = self.stop_ids[0] if self.stop_ids else None
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.special = dict(special or {})
        self.config = dict(config or {})
        self.source = source
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path, *, model_config: dict | None = None) -> "PretrainedTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(path)
        tok_file = root / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file {tok_file} does not exist")
        try:
            hf_tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
            raise ValueError(f"{tok_file} could not be read: {e}") from None
        tcfg = _read_json(root / TOKENIZER_CONFIG_FILE, "tokenizer config") if (root / TOKENIZER_CONFIG_FILE).is_file() else {}
        gen = _read_json(root / GENERATION_CONFIG_FILE, "generation config") if (root / GENERATION_CONFIG_FILE).is_file() else {}
        mcfg = model_config or {}
        special = {k: _token_text(tcfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = {k: v for k, v in special.items() if v}

        def tid(text):
            return None if text is None else hf_tok.token_to_id(text)

        eos = _as_ids(gen.get("eos_token_id")) or _as_ids(mcfg.get("eos_token_id"))
        if not eos and tid(special.get("eos_token")) is not None:
            eos = [tid(special["eos_token"])]
        bos = _as_ids(gen.get("bos_token_id")) or _as_ids(mcfg.get("bos_token_id"))
        bos_id = bos[0] if bos else tid(special.get("bos_token"))
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (root / CHAT_TEMPLATE_FILE).is_file():
            template = (root / CHAT_TEMPLATE_FILE).read_text()
        return cls(hf_tok, eos_ids=eos, bos_id=bos_id, chat_template=template, special=special,
                   config=tcfg, source=str(root))

    # Encoding / decoding ----------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        """A `flashjax.serving.detokenizer.Detokenizer` for text from ids as they are generated.

        Pass the prompt's ids so that the first generated word keeps its leading space.
        """
        from flashjax.serving.detokenizer import Detokenizer

        return Detokenizer(self, stop=stop, prompt_ids=prompt_ids)

    # Chat -----------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra):
        """Render `messages` [{"role": ..., "content": ...}] with the model's chat template.

        Returns the text, or with tokenize=True its ids encoded without adding special
        tokens again (templates write their own BOS, so `encode(text)` would double it).
        """
        if not self.chat_template:
            where = self.source or "this tokenizer"
            raise ValueError(f"{where} has no chat_template (tokenizer_config.json or chat_template.jinja)")
        variables = {
            "bos_token": self.special.get("bos_token", ""), "eos_token": self.special.get("eos_token", ""),
            "unk_token": self.special.get("unk_token", ""), "pad_token": self.special.get("pad_token", ""),
        }
        variables.update(extra)
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, path: str | Path) -> None:
        out = Path(path)
        if out.suffix == ".json":
            self.hf.save(str(out))
            return
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / TOKENIZER_FILE))
        cfg = dict(self.config)
        if self.chat_template and "chat_template" not in cfg:
            cfg["chat_template"] = self.chat_template
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for k, v in self.special.items():
            cfg.setdefault(k, v)
        (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def render_chat_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a Hugging Face chat template (Jinja) for `messages`."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2 (or flashjax[hf])") from None
    import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


def apply_chat_template(tokenizer: PretrainedTokenizer, messages: Sequence[dict], **kwargs):
    """`tokenizer.apply_chat_template(messages, **kwargs)` (for callers holding a tokenizer of either kind).

    The text by default; tokenize=True gives its ids without a second BOS.
    """
    fn = getattr(tokenizer, "apply_chat_template", None)
    if fn is None:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template (only Hugging Face tokenizers do)")
    return fn(messages, **kwargs)
