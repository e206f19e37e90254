"""Byte-level BPE tokenizer round trips, and the corpus / batch helpers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashjax.models.data import get_batch, load_corpus, split_tokens, stdlib_files, val_batches
from flashjax.models.tokenizer import EOT, Tokenizer, encode_documents

# Text without lone surrogates (those cannot be encoded as UTF-8 at all).
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    docs = load_corpus(None, max_bytes=150_000)
    return Tokenizer.train(docs, vocab_size=400)


@given(text=TEXT)
def test_text_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@given(data=st.binary(max_size=200))
def test_bytes_round_trip(tok, data):
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data


@given(text=TEXT)
def test_stream_decoder_matches_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    out = "".join(dec.push([i])[0] for i in ids) + dec.flush()
    assert out == text


def test_known_strings(tok):
    for s in ["def f(x):\n    return x  # héllo 🚀\n", "", " ", "\t\r\n", EOT + "x" + EOT, "a\x00b"]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode(EOT) == [tok.eot_id]
    assert len(tok.encode("def __init__(self):")) < len("def __init__(self):")  # merges learned


def test_save_load_and_hf_compat(tok, tmp_path):
    from tokenizers import Tokenizer as HF

    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    s = "import os\nclass A:\n    pass\n"
    assert again.encode(s) == tok.encode(s)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))  # plain `tokenizers` can use it too
    assert hf.decode(hf.encode(s).ids) == s
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")


def test_training_is_deterministic():
    docs = ["def a(): pass\n" * 50, "class B:\n    x = 1\n" * 50]
    a, b = Tokenizer.train(docs, 300), Tokenizer.train(docs, 300)
    assert a.hf.to_str() == b.hf.to_str()


# --------------------------------------------------------------------------
# Corpus and batches
# --------------------------------------------------------------------------


def test_default_corpus_is_stdlib_capped_and_deterministic():
    files = stdlib_files()
    assert files and all(f.suffix == ".py" for f in files)
    docs = load_corpus(None, max_bytes=200_000)
    assert 150_000 < sum(len(d.encode()) for d in docs) <= 200_000
    assert docs == load_corpus(None, max_bytes=200_000)


def test_data_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("bravo\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("charlie\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / ".hidden").write_text("secret\n")
    assert load_corpus(tmp_path) == ["alpha\n", "bravo\n", "charlie\n"]
    assert load_corpus(tmp_path / "b.txt") == ["bravo\n"]
    assert load_corpus(tmp_path, max_bytes=8) == ["alpha\n", "br"]


def test_bad_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corpus is empty"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00\x00")
    with pytest.raises(ValueError, match="not a readable UTF-8 text file"):
        load_corpus(tmp_path / "bin")
    if os.geteuid() != 0:
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        with pytest.raises(ValueError):
            load_corpus(locked)


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.int32)
    x1, y1 = get_batch(tokens, 16, seed=1, step=5, shape=(2, 3))
    x2, y2 = get_batch(tokens, 16, seed=1, step=5, shape=(2, 3))
    assert x1.shape == (2, 3, 16) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, x1 + 1)  # targets are the next tokens
    x3, _ = get_batch(tokens, 16, seed=1, step=6, shape=(2, 3))
    x4, _ = get_batch(tokens, 16, seed=2, step=5, shape=(2, 3))
    assert not np.array_equal(x1, x3) and not np.array_equal(x1, x4)


def test_split_and_validation_batches(tok):
    stream = encode_documents(tok, ["alpha beta\n" * 40, "gamma\n" * 40])
    assert stream[-1] == tok.eot_id
    d = split_tokens(stream, 0.1, 8)
    assert len(d.train) + len(d.val) == len(stream)
    np.testing.assert_array_equal(np.concatenate([d.train, d.val]), stream)
    vb = val_batches(d.val, 8, 2, 3)
    assert vb and all(x.shape == (2, 8) for x, _ in vb)
    with pytest.raises(ValueError, match="corpus too small"):
        split_tokens(stream[:10], 0.1, 8)
