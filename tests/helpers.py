"""Small helpers shared by the tests (import as `from helpers import tol, assert_close`).

pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode, no
tests/__init__.py), so test modules can import this file directly.
"""

from __future__ import annotations

import zlib

import numpy as np

# (atol, rtol) for attention outputs against `flashjax.attention_reference`.
# float32 on a GPU is looser because Triton dots may run in TF32.
_TOL = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-5, 1e-5),
    "float32-gpu": (2e-3, 2e-3),
    "bfloat16": (2e-2, 2e-2),
    "float16": (4e-3, 4e-3),
}
# Gradients sum over a whole sequence, so they get this many times more slack.
GRAD_FACTOR = 4.0


def tol(dtype, *, grad: bool = False, backend: str | None = None) -> tuple[float, float]:
    """(atol, rtol) for comparing an attention output (or gradient) of `dtype`."""
    name = np.dtype(dtype).name
    if name == "float32":
        if backend is None:
            import jax

            backend = jax.default_backend()
        if backend == "gpu":
            name = "float32-gpu"
    try:
        atol, rtol = _TOL[name]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {name}") from None
    if grad:
        atol, rtol = atol * GRAD_FACTOR, rtol * GRAD_FACTOR
    return atol, rtol


def assert_close(actual, expected, dtype=None, *, grad: bool = False, err_msg: str = "") -> None:
    """np.testing.assert_allclose in float64 with `tol(dtype)`; dtype defaults to actual's."""
    dtype = dtype if dtype is not None else np.asarray(actual).dtype
    atol, rtol = tol(dtype, grad=grad)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=err_msg)


def derive_seed(session_seed: int, nodeid: str) -> int:
    """Deterministic per-test seed from the session seed and the test's id."""
    return (session_seed * 1_000_003 + zlib.crc32(nodeid.encode())) % (2**31)


class KeySeq:
    """Fresh `jax.random` keys on demand: `rng()` returns a new key each call.

    `rng(3)` returns a tuple of 3 keys. `rng.seed` is the integer seed.
    """

    def __init__(self, seed: int):
        import jax

        self.seed = seed
        self._key = jax.random.key(seed)

    def __call__(self, n: int | None = None):
        import jax

        if n is None:
            self._key, sub = jax.random.split(self._key)
            return sub
        keys = jax.random.split(self._key, n + 1)
        self._key = keys[0]
        return tuple(keys[1:])


# Cases of the Hopper (Mosaic GPU) attention kernels against the reference: every pair of
# (causal, dtype, grouping) in 6 cases instead of the 12 of the cross product (on a GPU a
# case costs a compile of a forward and a backward kernel, tens of seconds in a parallel
# suite). Causal and full attention each meet bf16 and f16 and MHA 4:4, GQA 4:2 and MQA 3:1.
# The groupings take different backward paths at these sizes: MHA writes dK/dV in the
# input dtype through the K/V buffers; GQA and MQA (one program per query head) write
# float32 partial sums added up afterwards; MQA's group of 3 is not a power of two and its
# 128 rows are one forward tile (the causal diagonal inside it), the others' 256 and 384 are
# 2 and 3. bf16 and f16 compile the same kernel code (wgmma on 16-bit operands). Used at
# head_dim 64 by tests/test_attention.py::test_mosaic_matches_reference (through
# flash_attention) and at 128 and 256 by tests/test_attention_sm90.py.
MOSAIC_PAIRWISE_CASES = [  # causal, dtype name, (heads, kv_heads, seq)
    (True, "bfloat16", (4, 4, 256)),
    (False, "float16", (4, 4, 256)),
    (True, "float16", (4, 2, 384)),
    (False, "bfloat16", (4, 2, 384)),
    (True, "bfloat16", (3, 1, 128)),
    (False, "float16", (3, 1, 128)),
]
MOSAIC_PAIRWISE_IDS = [f"{'causal' if c else 'full'}-{dt}-{h}-{hk}-{n}"
                       for c, dt, (h, hk, n) in MOSAIC_PAIRWISE_CASES]


# Tiny Hugging Face architectures (transformers config class, kwargs) shared by
# tests/test_hf.py and tests/data/hf/make.py. initializer_range 0.2 makes the logits
# peaked enough that greedy decoding does not hinge on float rounding.
HF_TINY_VOCAB = 96
HF_TINY = {
    "gpt2": ("GPT2Config", dict(
        vocab_size=HF_TINY_VOCAB, n_positions=48, n_embd=32, n_head=4, n_layer=2, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0,
    )),
    "llama": ("LlamaConfig", dict(
        vocab_size=HF_TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
        initializer_range=0.2, tie_word_embeddings=False,
    )),
    "mistral": ("MistralConfig", dict(
        vocab_size=HF_TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4,
        initializer_range=0.2, tie_word_embeddings=True,
    )),
}
HF_TINY_GREEDY = 10  # new tokens in the greedy check (mistral: 16 positions against a window of 4)


def hf_tiny_ids(seed: int, shape=(2, 12)) -> np.ndarray:
    """Token ids for the tiny Hugging Face models (int64, like torch.long)."""
    return np.random.RandomState(seed).randint(0, HF_TINY_VOCAB, shape).astype(np.int64)


def check_hf_tiny_config(name: str, c) -> None:
    """The flashjax ModelConfig that from_pretrained made of HF_TINY[name] (float32)."""
    assert c.dtype == c.param_dtype == "float32"
    assert c.family == ("gpt2" if name == "gpt2" else "llama")
    if name == "mistral":
        assert c.sliding_window == 4 and c.kv_heads == 1 and c.tied
    if name == "llama":
        assert c.kv_heads == 2 and c.rope_theta == 500.0 and not c.tied


def sentencepiece_style_tokenizer(vocab_size: int = HF_TINY_VOCAB, *, byte_fallback: bool = False):
    """A `tokenizers.Tokenizer` BPE with Metaspace ('▁' word starts) like Llama/Mistral's, with <s> and </s>.

    Encoding adds <s> in front. byte_fallback=True gives it Llama's <0x00>..<0xFF>
    ids (appended after the trained vocabulary) for characters outside it, and
    Llama's decoder, which joins runs of those bytes into characters.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld", "tokens stream well"] * 10
    t.train_from_iterator(text, trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if not byte_fallback:
        return t
    spec = json.loads(t.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ]).__getstate__())
    return Tokenizer.from_str(json.dumps(spec))
