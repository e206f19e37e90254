"""Hugging Face checkpoints without torch: load the tiny GPT-2 / Llama / Mistral
directories that transformers wrote into tests/data/hf (see make.py there) and compare
with the logits and greedy tokens transformers computed on them (reference.npz);
reject bad input with the file and tensor named.

These need no torch or transformers, so checkpoint loading stays checked where the
[hf] extra is not installed; tests/test_hf.py compares live against transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flashjax.models import from_pretrained, save_pretrained
from flashjax.models import hf
from flashjax.models.config import ModelConfig
from flashjax.models.generate import DenseCacheSampler
from flashjax.models.gpt import abstract_model, build_model
from helpers import HF_TINY, HF_TINY_GREEDY, HF_TINY_VOCAB, check_hf_tiny_config, hf_tiny_ids

DATA = Path(__file__).resolve().parent / "data" / "hf"
ATOL = 1e-4


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _logits(model, ids) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids)))


def _reference(name: str) -> dict:
    with np.load(DATA / name / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def test_reference_data_is_what_the_tests_expect():
    """The committed directories match helpers.HF_TINY (regenerate with tests/data/hf/make.py)."""
    for name, (_, kwargs) in HF_TINY.items():
        cfg = json.loads((DATA / name / "config.json").read_text())
        assert cfg["vocab_size"] == kwargs["vocab_size"]
        ref = _reference(name)
        np.testing.assert_array_equal(ref["ids"], hf_tiny_ids(1))
        np.testing.assert_array_equal(ref["prompt"], hf_tiny_ids(4, (1, 6)))
        assert ref["logits"].shape == (2, 12, HF_TINY_VOCAB) and ref["greedy"].shape == (HF_TINY_GREEDY,)
        assert np.isfinite(ref["logits"]).all() and ref["logits"].std() > 0.1


@pytest.mark.parametrize("name", list(HF_TINY))
def test_logits_match_reference(name):
    model, tok = from_pretrained(DATA / name, attention="xla")
    assert tok is None  # no tokenizer.json in these directories
    check_hf_tiny_config(name, model.config)
    ref = _reference(name)
    ours = _logits(model, ref["ids"])
    assert ours.shape == (2, 12, HF_TINY_VOCAB) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_flash_attention_on_a_checkpoint(name):
    """The Pallas kernel (interpret mode on CPU) on a loaded checkpoint: causal (GPT-2),
    grouped-query with a sliding window (Mistral)."""
    model, _ = from_pretrained(DATA / name, attention="flash")
    assert model.config.attention == "flash"
    ref = _reference(name)
    np.testing.assert_allclose(_logits(model, ref["ids"]), ref["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(HF_TINY))
def test_greedy_generation_matches_reference(name):
    model, _ = from_pretrained(DATA / name, attention="xla")
    ref = _reference(name)
    sampler = DenseCacheSampler(model, temperature=0.0)
    ours = np.concatenate([np.asarray(t) for t in sampler.generate(ref["prompt"], HF_TINY_GREEDY)])
    assert ours.tolist() == ref["greedy"].tolist()


def test_mistral_sliding_window_binds():
    """With the window dropped, the logits past position 4 differ: the window is really applied."""
    model, _ = from_pretrained(DATA / "mistral", attention="xla")
    full_cfg = model.config.replace(sliding_window=None)
    full = nnx.merge(nnx.split(abstract_model(full_cfg))[0], nnx.state(model))
    ids = hf_tiny_ids(2)
    windowed, unwindowed = _logits(model, ids), _logits(full, ids)
    np.testing.assert_allclose(windowed[:, :4], unwindowed[:, :4], atol=1e-5)
    assert np.abs(windowed[:, 5:] - unwindowed[:, 5:]).max() > 1e-2


def _rewrite(d, edit):
    """Rewrite d/model.safetensors with edit(dict of numpy tensors)."""
    st = hf.SafetensorsFile(d / hf.WEIGHTS_FILE)
    tensors = {name: np.array(st.get(name)) for name in st.tensors}
    st.close()
    edit(tensors)
    hf.write_safetensors(d / hf.WEIGHTS_FILE, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])


def _copy(name, tmp_path):
    d = tmp_path / name
    shutil.copytree(DATA / name, d)
    return d


def test_gpt2_original_layout_and_shorter_context(tmp_path):
    """openai-community/gpt2 style: no "transformer." prefix, attn.bias buffers; max_seq_len below n_positions."""
    d = _copy("gpt2", tmp_path)

    def strip(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))

    _rewrite(d, strip)
    model, _ = from_pretrained(d, attention="xla", max_seq_len=16)
    assert model.config.max_seq_len == 16 and model.wpe[...].shape == (16, 32)
    ref = _reference("gpt2")
    np.testing.assert_allclose(_logits(model, ref["ids"]), ref["logits"], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="exceeds the checkpoint's n_positions"):
        from_pretrained(d, max_seq_len=64)


def test_sharded_checkpoint(tmp_path):
    """An index file plus shards (as save_pretrained(max_shard_size=...) writes) loads the same model."""
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(DATA / "llama" / "config.json", d)
    st = hf.SafetensorsFile(DATA / "llama" / hf.WEIGHTS_FILE)
    names = sorted(st.tensors)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: np.array(st.get(k)) for k in names[i::3]}
        hf.write_safetensors(d / shard, [(k, a.shape, a.dtype, lambda a=a: a) for k, a in part.items()])
        weight_map |= dict.fromkeys(part, shard)
    st.close()
    (d / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = from_pretrained(d, attention="xla")
    ref = _reference("llama")
    np.testing.assert_allclose(_logits(model, ref["ids"]), ref["logits"], atol=ATOL, rtol=0)
    missing = d / "model-00002-of-00003.safetensors"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        from_pretrained(d)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.fixture
def llama_dir(tmp_path):
    return _copy("llama", tmp_path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_missing_safetensors(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(llama_dir)


def test_unsupported_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["BertForMaskedLM"], "bert"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture BertForMaskedLM.*LlamaForCausalLM") as e:
        from_pretrained(llama_dir)
    assert "config.json" in str(e.value)


def test_unsupported_rope_scaling(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama3"):
        from_pretrained(llama_dir)


def test_older_config_keys(llama_dir):
    """Configs written before transformers 5 keep rope_theta at the top level (no rope_parameters)."""
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    model, _ = from_pretrained(llama_dir, attention="xla")
    assert model.config.rope_theta == 500.0 and model.config.dtype == "float32"
    ref = _reference("llama")
    np.testing.assert_allclose(_logits(model, ref["ids"]), ref["logits"], atol=ATOL, rtol=0)


def test_wrong_tensor_shape(llama_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(llama_dir, lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ValueError, match=rf"{name}.*model.safetensors.*shape \[15, 32\], expected \[16, 32\]"):
        from_pretrained(llama_dir)


def test_missing_tensor(llama_dir):
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(llama_dir, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"tensor '{name}' is missing from .*model.safetensors"):
        from_pretrained(llama_dir)


def test_truncated_file(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        from_pretrained(llama_dir)


def test_save_unsupported_combination(tmp_path):
    config = ModelConfig(family="gpt2", vocab_size=HF_TINY_VOCAB, n_layer=1, d_model=32, n_head=4, n_kv_head=2,
                         max_seq_len=16, attention="xla")
    with pytest.raises(ValueError, match="grouped-query"):
        save_pretrained(build_model(config), tmp_path)


def test_save_and_load_roundtrip_without_torch(tmp_path):
    """save_pretrained then from_pretrained gives the same logits (transformers opening it: test_hf.py)."""
    model, _ = from_pretrained(DATA / "llama", attention="xla")
    save_pretrained(model, tmp_path)
    back, _ = from_pretrained(tmp_path, attention="xla")
    ids = hf_tiny_ids(3)
    np.testing.assert_array_equal(_logits(back, ids), _logits(model, ids))
