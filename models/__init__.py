"""flashjax.models: a Flax NNX GPT (GPT-2 and Llama styles) that trains with the flash kernels.

Names are imported lazily, so `import flashjax.models` is cheap.

    from flashjax.models import GPT, config_from_preset
    cfg = config_from_preset("nano", attention="flash")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)            # [batch, seq] ints -> [batch, seq, vocab] float32
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # config
    "ModelConfig": "config", "PRESETS": "config", "config_from_preset": "config",
    "parse_overrides": "config", "config_diff": "config",
    # model
    "GPT": "gpt", "Attention": "gpt", "Block": "gpt", "MLP": "gpt", "build_model": "gpt",
    "abstract_model": "gpt", "apply_rope": "gpt", "rope_tables": "gpt",
    # attention operators
    "resolve_attention": "attention_ops", "causal_attention": "attention_ops", "xla_attention": "attention_ops",
    # tokenizer and data
    "Tokenizer": "tokenizer", "load_corpus": "data", "get_batch": "data",
    # training, checkpoints, loading for generation (text generation: flashjax.serving.generate)
    "train": "train", "TrainArgs": "train", "make_train_step": "train", "make_optimizer": "train",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "read_config": "checkpoint",
    "check_config": "checkpoint", "load_model": "generate", "DenseCacheSampler": "generate",
    # Hugging Face checkpoints
    "from_pretrained": "hf", "save_pretrained": "hf", "PretrainedTokenizer": "hf",
    "apply_chat_template": "hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'flashjax.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flashjax.models.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
