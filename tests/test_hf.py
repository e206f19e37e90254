"""Hugging Face checkpoints (flashjax.models.hf): load GPT-2 / Llama / Mistral
directories written by `transformers`, compare logits and greedy generation with
transformers itself, save our models so transformers opens them, and reject bad
input with the file and tensor named.

Needs the [hf] extra (torch, transformers, safetensors); all on CPU with tiny
random-weight models. tests/test_hf_golden.py covers loading and bad input without
torch, against reference numbers transformers wrote into tests/data/hf.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Hugging Face tests need torch (pip install -e '.[hf]')")
transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need transformers (pip install -e '.[hf]')"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from flashjax.models import from_pretrained, save_pretrained  # noqa: E402
from flashjax.models import hf  # noqa: E402
from flashjax.models.config import ModelConfig  # noqa: E402
from flashjax.models.generate import DenseCacheSampler, load_model  # noqa: E402
from flashjax.models.gpt import build_model  # noqa: E402
from helpers import HF_TINY, HF_TINY_VOCAB, check_hf_tiny_config, sentencepiece_style_tokenizer  # noqa: E402

VOCAB = HF_TINY_VOCAB
ATOL = 1e-4
HF_CONFIGS = {name: (lambda cls=cls, kw=kw: getattr(transformers, cls)(**kw)) for name, (cls, kw) in HF_TINY.items()}
DATA = Path(__file__).resolve().parent / "data" / "hf"


def _hf_model(name: str, dtype=torch.float32):
    torch.manual_seed(abs(hash(name)) % 1000)
    config = HF_CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return model.eval()


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _logits(model, ids) -> np.ndarray:
    """Our logits (jitted: one compile beats op-by-op dispatch on CPU)."""
    return np.asarray(_forward(model, jnp.asarray(ids)))


def _ids(seed: int, shape=(2, 12)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (hf model, directory)} saved with save_pretrained(safe_serialization=True)."""
    out = {}
    for name in HF_CONFIGS:
        model = _hf_model(name)
        d = tmp_path_factory.mktemp(f"hf-{name}")
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (model, d)
    return out


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(saved, name):
    hf_model, d = saved[name]
    model, tok = from_pretrained(d, attention="xla")
    assert tok is None  # no tokenizer.json in these directories
    check_hf_tiny_config(name, model.config)
    ids = _ids(1)
    ours = _logits(model, ids)
    ref = _hf_logits(hf_model, ids)
    assert ours.shape == (2, 12, VOCAB) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(HF_TINY))
def test_reference_data_matches_installed_transformers(name):
    """The committed tests/data/hf checkpoints (test_hf_golden.py's reference) still give
    the recorded logits and greedy tokens in the installed transformers."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(DATA / name, attn_implementation="eager").eval()
    with np.load(DATA / name / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    np.testing.assert_allclose(_hf_logits(hf_model, ref["ids"]), ref["logits"], atol=1e-5, rtol=0)
    with torch.no_grad():
        greedy = hf_model.generate(
            torch.tensor(ref["prompt"]), max_new_tokens=len(ref["greedy"]), min_new_tokens=len(ref["greedy"]),
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, ref["prompt"].shape[1]:].numpy()
    assert greedy.tolist() == ref["greedy"].tolist()


def test_sliding_window_longer_than_context_is_dropped(tmp_path):
    config = HF_CONFIGS["mistral"]()
    config.sliding_window = 4096
    c = hf.config_from_hf(config.to_dict() | {"architectures": ["MistralForCausalLM"]})
    assert c.sliding_window is None and c.max_seq_len == 64


def test_sharded_checkpoint(saved, tmp_path):
    hf_model, _ = saved["llama"]
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="10KB")
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / hf.WEIGHTS_FILE).exists()
    model, _ = from_pretrained(tmp_path, attention="xla")
    ids = _ids(3)
    np.testing.assert_allclose(_logits(model, ids), _hf_logits(hf_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_generation_matches_transformers(saved, name):
    hf_model, d = saved[name]
    model, _ = from_pretrained(d, attention="xla")
    prompt = _ids(4, (1, 6))
    n_new = 10  # mistral: 16 positions against a window of 4
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, prompt.shape[1]:].numpy()
    sampler = DenseCacheSampler(model, temperature=0.0)
    ours = np.concatenate([np.asarray(t) for t in sampler.generate(prompt, n_new)])
    assert ours.tolist() == ref.tolist()


def test_bf16_checkpoint_loads_without_an_fp32_copy(saved, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype") == "bfloat16"
    sd = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    fp32_bytes = 4 * sum(v.size for v in sd.values())

    from_pretrained(saved["llama"][1], attention="xla")  # warm up: lazy imports are not the loader's memory
    tracemalloc.start()
    model, _ = from_pretrained(tmp_path, attention="xla")  # default: the checkpoint's dtype
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    c = model.config
    assert c.dtype == c.param_dtype == "bfloat16"
    assert model.wte[...].dtype == jnp.bfloat16
    # host buffers stay within one bf16 copy of the model: no fp32 model is ever built
    assert peak < 0.6 * fp32_bytes, (peak, fp32_bytes)

    # bf16 values are taken bit for bit; q|k|v and gate|up are fused in order
    qkv = np.asarray(model.blocks[1].attn.wqkv.kernel[...].astype(jnp.float32))
    q, k, v = (sd[f"model.layers.1.self_attn.{p}_proj.weight"].T for p in "qkv")
    np.testing.assert_array_equal(qkv, np.concatenate([q, k, v], axis=1))
    w_in = np.asarray(model.blocks[0].mlp.w_in.kernel[...].astype(jnp.float32))
    gate, up = (sd[f"model.layers.0.mlp.{p}_proj.weight"].T for p in ("gate", "up"))
    np.testing.assert_array_equal(w_in, np.concatenate([gate, up], axis=1))
    np.testing.assert_array_equal(np.asarray(model.lm_head[...].astype(jnp.float32)), sd["lm_head.weight"].T)

    ids = np.random.RandomState(5).randint(0, 4096, (2, 12))
    ref = _hf_logits(hf_model.float(), ids)
    m32, _ = from_pretrained(tmp_path, dtype="float32", attention="xla")
    assert m32.wte[...].dtype == jnp.float32
    np.testing.assert_allclose(_logits(m32, ids), ref, atol=ATOL, rtol=0)
    bf = _logits(model, ids)
    assert np.abs(bf - ref).max() < 0.1 * np.abs(ref).max()
    m16, _ = from_pretrained(tmp_path, dtype="fp16", attention="xla")
    assert m16.wte[...].dtype == jnp.float16 and m16.config.dtype == "float16"


# ---------------------------------------------------------------------------
# Saving: our models open in transformers
# ---------------------------------------------------------------------------

ROUNDTRIP = {
    "gpt2": dict(family="gpt2", vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, max_seq_len=32),
    "llama-tied": dict(family="llama", vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=40,
                       max_seq_len=32, rope_theta=1000.0, norm_eps=1e-6),
    "llama-bias-untied": dict(family="llama", vocab_size=VOCAB, n_layer=1, d_model=32, n_head=4, n_kv_head=1,
                              d_ff=40, max_seq_len=32, use_bias=True, tie_embeddings=False),
    "mistral": dict(family="llama", vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=40,
                    max_seq_len=32, sliding_window=5, tie_embeddings=False),
}


def _randomize_biases(model, seed=0):
    """Our models start with zero biases and unit norms; perturb them so a mix-up would show."""
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    rng = np.random.RandomState(seed)
    new = []
    for path, var in flat:
        val = var.get_value()
        if path[-1] in ("bias", "scale"):
            val = val + jnp.asarray(rng.normal(0, 0.1, val.shape), val.dtype)
        new.append((path, var.replace(val)))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def _canonical(c: ModelConfig) -> dict:
    """The config's architecture with defaults resolved (None -> the family's value), runtime fields dropped."""
    d = c.to_dict()
    for k in ("attention", "dtype", "remat", "n_kv_head", "d_ff", "tie_embeddings", "use_bias"):
        d.pop(k)
    return d | dict(kv_heads=c.kv_heads, ffn_dim=c.ffn_dim, tied=c.tied, bias=c.bias)


@pytest.mark.parametrize("name", list(ROUNDTRIP))
def test_save_pretrained_opens_in_transformers(tmp_path, name):
    config = ModelConfig(**ROUNDTRIP[name], attention="xla", init_std=0.2)
    model = _randomize_biases(build_model(config, seed=3))
    save_pretrained(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expected = {"gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM"}.get(name, "LlamaForCausalLM")
    assert type(hf_model).__name__ == expected
    ids = _ids(6, (2, 16))
    ours = _logits(model, ids)
    np.testing.assert_allclose(_hf_logits(hf_model, ids), ours, atol=ATOL, rtol=0)
    back, _ = from_pretrained(tmp_path, attention="xla")
    assert _canonical(back.config) == _canonical(config)
    np.testing.assert_array_equal(_logits(back, ids), ours)


def test_save_pretrained_bf16_and_tokenizer(tmp_path):
    from flashjax.models.tokenizer import Tokenizer

    tok = Tokenizer.train(["def foo(x):\n    return x + 1\n"] * 20 + ["class Bar:\n    pass\n"] * 20, VOCAB + 200)
    config = ModelConfig(**ROUNDTRIP["llama-tied"] | {"vocab_size": tok.vocab_size}, attention="xla")
    model = build_model(config)
    save_pretrained(model, tmp_path, tok, dtype="bfloat16")
    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    assert saved_cfg["eos_token_id"] == tok.eot_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf_model.dtype == torch.bfloat16
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "def foo(x): return x"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    model2, tok2 = from_pretrained(tmp_path)
    assert model2.config.param_dtype == "bfloat16" and tok2.eot_id == tok.eot_id
    assert tok2.encode(text) == tok.encode(text)


# ---------------------------------------------------------------------------
# Tokenizer, chat template, CLI
# ---------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _add_tokenizer(d, *, chat=True):
    t = sentencepiece_style_tokenizer()
    t.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat:
        cfg["chat_template"] = CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_tokenizer_stream_and_chat_template(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved["llama"][1], d)
    _add_tokenizer(d)
    _, tok = from_pretrained(d, attention="xla")
    assert isinstance(tok, hf.PretrainedTokenizer)
    text = "the quick brown fox, héllo wörld"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1 and tok.eot_id == 2  # eos from generation_config.json
    assert tok.decode(ids[1:]) == text
    dec = tok.stream_decoder()
    streamed = "".join(dec.push([i])[0] for i in ids[1:]) + dec.flush()
    assert streamed == text
    # after the prompt "the quick", the next word keeps its leading space
    head = tok.encode("the quick")
    dec = tok.stream_decoder(prompt_ids=head)
    assert "".join(dec.push([i])[0] for i in ids[len(head):]) + dec.flush() == text[len("the quick"):]
    messages = [{"role": "user", "content": "hi there"}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == "<s><|user|>hi there</s><|assistant|>"
    assert hf.apply_chat_template(tok, messages) == rendered
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert hf_tok(text)["input_ids"] == ids
    chat_ids = tok.apply_chat_template(messages, tokenize=True)
    assert chat_ids.count(tok.bos_id) == 1  # the template's BOS only
    assert chat_ids == hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)


def test_no_chat_template_is_a_clear_error(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved["gpt2"][1], d)
    _add_tokenizer(d, chat=False)
    _, tok = from_pretrained(d, attention="xla")
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_generate_cli_on_hf_directory(saved, tmp_path, capsys):
    from flashjax.models.cli import main

    d = tmp_path / "m"
    shutil.copytree(saved["mistral"][1], d)
    _add_tokenizer(d)
    model, tok, config = load_model(d, attention="xla")
    assert config.sliding_window == 4 and isinstance(tok, hf.PretrainedTokenizer)
    status = main(["generate", "--checkpoint", str(d), "--prompt", "the quick", "--max-new-tokens", "6",
                   "--temperature", "0", "--attention", "xla"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert out.out.startswith("the quick")
    # the printed continuation is the greedy one
    prompt = tok.encode("the quick")
    ref = [int(t[0]) for t in DenseCacheSampler(model, temperature=0.0).generate(prompt, 6)]
    if tok.eot_id in ref:
        ref = ref[: ref.index(tok.eot_id)]
    # ... with its first word's leading space: the text of prompt + continuation, less the <s>
    assert out.out.rstrip("\n") == tok.decode(prompt[1:] + ref)


# ---------------------------------------------------------------------------
# Bad input (the rest, without torch: tests/test_hf_golden.py)
# ---------------------------------------------------------------------------

def test_missing_shard(saved, tmp_path):
    saved["llama"][0].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="10KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        from_pretrained(tmp_path)


def test_dtype_names():
    assert hf.normalize_dtype("bf16") == hf.normalize_dtype(jnp.bfloat16) == "bfloat16"
    assert hf.normalize_dtype("torch.float16") == hf.normalize_dtype(torch.float16) == "float16"
    with pytest.raises(ValueError, match="unsupported dtype"):
        hf.normalize_dtype("int8")
    assert jax.numpy.dtype(hf.normalize_dtype("fp32")) == jnp.float32


def test_server_chat_uses_the_template_ids_and_every_eos(saved, tmp_path):
    """`flashjax serve --checkpoint HFDIR`: chat prompts are the template's ids (one BOS),
    and every EOS id of the tokenizer stops a request."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from flashjax.serving.server import _Service, load_for_serving

    d = tmp_path / "m"
    shutil.copytree(saved["llama"][1], d)
    _add_tokenizer(d)
    model, tok = load_for_serving(str(d), attention="xla")[:2]
    engine = type("E", (), {"config": model.config, "max_len": 64})()
    svc = _Service(engine, tok, "m")
    messages = [{"role": "user", "content": "hi there"}]
    ids = svc.chat_prompt_ids({"messages": messages})
    assert ids == tok.apply_chat_template(messages, tokenize=True)
    assert ids.count(tok.bos_id) == 1
    tok.stop_ids = [2, 7]  # e.g. Llama 3's <|eot_id|> beside <|end_of_text|>
    params = svc.params({"max_tokens": 4}, len(ids))
    assert {2, 7} <= set(params.stop_token_ids)
    params = svc.params({"max_tokens": 4, "ignore_eos": True}, len(ids))
    assert not {2, 7} & set(params.stop_token_ids)
