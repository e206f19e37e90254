"""flashjax.serving.detokenizer.Detokenizer: streamed text equals the full decode,
never shows half a character, cuts stop strings that span ids exactly, keeps
SentencePiece leading spaces, and costs O(new ids) per push. CPU only, no model.
"""

from __future__ import annotations

import random

import pytest

from flashjax.models import hf
from flashjax.models.tokenizer import Tokenizer
from flashjax.serving.detokenizer import MAX_PENDING, Detokenizer
from helpers import sentencepiece_style_tokenizer

# Characters of 1 to 4 UTF-8 bytes.
CHARS = list("ab xyz,.\n") + list("éöß") + list("中文字符✓∑") + ["🚀", "😀", "𝄞"]
TRAIN = ["héllo wörld 🚀 中文字符 emoji 😀😀 and ascii text, the quick brown fox ✓ ∑ 𝄞"] * 30


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    """The repo's byte-level BPE; its merges cut multi-byte characters (b' w\\xc3', b'\\xb6rld')."""
    return Tokenizer.train(TRAIN, vocab_size=320)


@pytest.fixture(scope="module")
def sp_tok() -> hf.PretrainedTokenizer:
    """The SentencePiece-style tokenizer of tests/test_hf.py, with Llama's byte fallback."""
    return hf.PretrainedTokenizer(sentencepiece_style_tokenizer(byte_fallback=True), eos_ids=[2], bos_id=1)


class WindowOnly:
    """A tokenizer seen through `decode` alone (no decode_bytes): the sliding-window path."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids)


def random_text(r: random.Random, n: int) -> str:
    return "".join(r.choice(CHARS) for _ in range(n))


def split_ids(tok: Tokenizer, r: random.Random, data: bytes) -> list[int]:
    """Ids for `data`, mixing BPE pieces with single-byte ids that cut characters anywhere."""
    ids, pos = [], 0
    while pos < len(data):
        n = r.randint(1, 6)
        chunk = data[pos: pos + n]
        pos += n
        if r.random() < 0.5:
            ids.extend(tok.encode_bytes(chunk))
        else:
            ids.extend(tok.encode_bytes(bytes([b]))[0] for b in chunk)
    return ids


def random_bytes(r: random.Random) -> bytes:
    """Mostly valid UTF-8, sometimes with invalid bytes or a character cut short."""
    data = random_text(r, r.randint(0, 30)).encode()
    if r.random() < 0.3:
        junk = r.choice([b"\xff", b"\x80", b"\xe4\xb8", b"\xf0\x9f\x9a", b"\xed\xa0\x80", b"\xc3"])
        at = r.randint(0, len(data))
        data = data[:at] + junk + data[at:]
    if r.random() < 0.2:
        data += r.choice([b"\xf0", b"\xf0\x9f", b"\xe4\xb8", b"\xc3"])  # ends mid-character
    return data


def batches(r: random.Random, ids: list[int]):
    i = 0
    while i < len(ids):
        n = r.choice([1, 1, 1, 2, 3, 5])
        yield ids[i: i + n]
        i += n


def stream(detok: Detokenizer, r: random.Random, ids: list[int]) -> list[str]:
    out = [detok.push(b)[0] for b in batches(r, ids)]
    out.append(detok.flush())
    return out


# ---------------------------------------------------------------------------
# (a) streamed text == full decode, never half a character
# ---------------------------------------------------------------------------

def test_random_byte_sequences_match_decode(byte_tok):
    r = random.Random(0)
    for _ in range(300):
        ids = split_ids(byte_tok, r, random_bytes(r))
        full = byte_tok.decode(ids)
        detok = byte_tok.stream_decoder()
        assert isinstance(detok, Detokenizer)
        shown, pushed = "", []
        for b in batches(r, ids):
            delta, stopped = detok.push(b)
            assert not stopped
            pushed.extend(b)
            shown += delta
            # never ahead of the full decode: a U+FFFD shown is one the full text has too
            assert full.startswith(shown), (ids, shown)
            # and never late: all but the bytes of an incomplete character at the end is out
            now = byte_tok.decode(pushed)
            rest = now[len(shown):]
            assert now.startswith(shown) and set(rest) <= {"\ufffd"} and len(rest) < 4, (pushed, shown)
            assert detok.num_tokens == len(pushed) and detok.text == shown
        shown += detok.flush()
        assert shown == full == detok.text


def test_window_path_on_byte_tokens_matches_decode(byte_tok):
    """The sliding window (used by tokenizers without decode_bytes) on characters cut across ids."""
    r = random.Random(1)
    for _ in range(200):
        ids = split_ids(byte_tok, r, random_text(r, r.randint(0, 40)).encode())
        full = byte_tok.decode(ids)
        detok = Detokenizer(WindowOnly(byte_tok))
        shown = ""
        for b in batches(r, ids):
            delta = detok.push(b)[0]
            assert "\ufffd" not in delta, (ids, delta)
            shown += delta
            assert full.startswith(shown)
        assert shown + detok.flush() == full


def test_window_path_shows_text_before_an_incomplete_character(byte_tok):
    # an id whose bytes are ASCII and then the first byte of "é" (b"\xc3\xa9"), e.g. b" w\xc3"
    cut = [i for i in range(byte_tok.vocab_size)
           if len(b := byte_tok.decode_bytes([i])) > 1 and b[-1] == 0xC3 and b[:-1].isascii()]
    assert cut, "the trained vocabulary has no id that ends inside a character"
    head = byte_tok.decode_bytes(cut[:1])[:-1].decode()
    detok = Detokenizer(WindowOnly(byte_tok))
    assert detok.push(cut[:1]) == (head, False)  # the ASCII part does not wait for the "é"
    assert detok.push(byte_tok.encode_bytes(b"\xa9")) == ("é", False)
    assert detok.flush() == "" and detok.text == head + "é"


def test_ends_mid_character(byte_tok):
    rocket = "🚀".encode()
    ids = byte_tok.encode("ok ") + [byte_tok.encode_bytes(bytes([b]))[0] for b in rocket[:3]]
    detok = Detokenizer(byte_tok)
    assert detok.push(ids) == ("ok ", False)  # the three bytes of the rocket wait
    assert detok.flush() == "\ufffd" == byte_tok.decode(ids)[3:]
    with pytest.raises(RuntimeError, match="after flush"):
        detok.push([1])


# ---------------------------------------------------------------------------
# (b) stop strings across id boundaries
# ---------------------------------------------------------------------------

def _first_stop(decode, ids, stops):
    """(ids consumed, text) of a sequence that ends at the first id whose text holds a stop string."""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        starts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if starts:
            return k, text[: min(starts)]
    return None, decode(ids)


@pytest.mark.parametrize("window", [False, True])
def test_stop_strings_cut_exactly(byte_tok, window):
    r = random.Random(2)
    words = ["ab", "b", " x", "中文", "🚀", "\n\n", "字符z"]
    hits = 0
    for _ in range(400):
        text = random_text(r, r.randint(0, 40))
        stops = r.sample(words, r.randint(1, 3))
        ids = split_ids(byte_tok, r, text.encode())
        k, expected = _first_stop(byte_tok.decode, ids, stops)
        detok = Detokenizer(WindowOnly(byte_tok) if window else byte_tok, stop=stops)
        hold = max(map(len, stops)) - 1
        shown, pushed, stopped = "", [], False
        for b in batches(r, ids):
            delta, stopped = detok.push(b)
            pushed.extend(b)
            shown += delta
            assert expected.startswith(shown), (text, stops, shown)  # nothing past the cut, ever
            if stopped:
                break
            # not held longer than a stop string's start (+ an incomplete character)
            assert len(shown) >= len(byte_tok.decode(pushed)) - hold - 1
        if k is None:
            assert not stopped and detok.num_tokens == len(ids)
            shown += detok.flush()
        else:
            hits += 1
            assert stopped and detok.stopped and detok.num_tokens == k, (text, stops, k)
            assert detok.push(ids[:1]) == ("", True) and detok.flush() == ""
        assert shown == expected == detok.text
    assert hits > 100


def test_stop_string_split_over_ids(byte_tok):
    def one(b: bytes) -> list[int]:
        return [byte_tok.encode_bytes(b)[0]]

    head = byte_tok.encode_bytes(b"done<") + byte_tok.encode_bytes(b"/en")
    detok = Detokenizer(byte_tok, stop=["</end>", "</x>"])
    assert detok.push(head) == ("done", False)  # "</en" could still become "</end>"
    assert detok.push(one(b"d")) == ("", False)
    assert detok.push(one(b">") + one(b"z")) == ("", True)
    assert detok.text == "done" and detok.num_tokens == len(head) + 2  # the "z" is not consumed
    assert detok.push(one(b"y")) == ("", True) and detok.flush() == ""
    # the held-back "</" comes out as soon as it cannot start a stop string
    detok = Detokenizer(byte_tok, stop=["</end>", "</x>"])
    assert detok.push(byte_tok.encode("a</")) == ("a", False)
    assert detok.push(byte_tok.encode("e")) == ("", False)
    assert detok.push(byte_tok.encode("f")) == ("</ef", False)
    # a held-back start that never completes comes out in flush
    detok = Detokenizer(byte_tok, stop="</end>")
    assert detok.push(byte_tok.encode("x </e")) == ("x ", False)
    assert detok.flush() == "</e" and detok.text == "x </e" and not detok.stopped


def test_stop_string_split_inside_a_character(byte_tok):
    rocket = [byte_tok.encode_bytes(bytes([b]))[0] for b in "🚀".encode()]
    detok = Detokenizer(byte_tok, stop=["🚀"])
    assert detok.push(byte_tok.encode("go ") + rocket[:2]) == ("go ", False)
    assert detok.push(rocket[2:] + byte_tok.encode("after")) == ("", True)
    assert detok.text == "go " and detok.num_tokens == len(byte_tok.encode("go ")) + 4


def test_stop_string_completed_by_flush(byte_tok):
    detok = Detokenizer(byte_tok, stop=["x\ufffd"])  # only a truncated character can end it
    assert detok.push(byte_tok.encode("ax") + byte_tok.encode_bytes(b"\xe4")) == ("a", False)
    assert detok.flush() == "" and detok.stopped and detok.text == "a"


def test_bad_stop_strings(byte_tok):
    with pytest.raises(ValueError, match="non-empty"):
        Detokenizer(byte_tok, stop=[""])


# ---------------------------------------------------------------------------
# (c) Hugging Face (SentencePiece-style) tokenizers
# ---------------------------------------------------------------------------

def test_hf_leading_spaces(sp_tok):
    ids = sp_tok.encode("the quick brown fox")[1:]  # without <s>
    assert len(ids) == 4
    detok = sp_tok.stream_decoder()
    assert isinstance(detok, Detokenizer)
    assert [detok.push([i])[0] for i in ids] == ["the", " quick", " brown", " fox"]
    assert detok.flush() == "" and detok.text == sp_tok.decode(ids) == "the quick brown fox"
    # after a prompt, the first new word keeps its space (decoded alone it would lose it)
    prompt = sp_tok.encode("the quick")
    assert sp_tok.decode(ids[2:]) == "brown fox"
    detok = sp_tok.stream_decoder(prompt_ids=prompt)
    assert [detok.push([i])[0] for i in ids[2:]] == [" brown", " fox"]
    assert detok.flush() == "" and detok.text == " brown fox"  # no prompt text


def test_hf_byte_fallback_characters(sp_tok):
    r = random.Random(3)
    words = ["the", "quick", "héllo", "wörld", "🚀", "中文", "x😀y", "fox"]
    for _ in range(100):
        text = " ".join(r.choice(words) for _ in range(r.randint(1, 12)))
        ids = sp_tok.encode(text)[1:]
        assert sp_tok.decode(ids) == text
        detok = Detokenizer(sp_tok, stop=["\n"])  # never found, but holds nothing back
        shown = ""
        for b in batches(r, ids):
            delta, _ = detok.push(b)
            assert "\ufffd" not in delta, (text, delta)
            shown += delta
            assert text.startswith(shown)
        assert shown + detok.flush() == text
    # a sequence that ends inside a character shows its bytes' U+FFFDs at the end
    ids = sp_tok.encode("the 🚀")[1:-2]
    detok = Detokenizer(sp_tok)
    assert detok.push(ids) == ("the ", False)
    assert detok.flush() == "\ufffd\ufffd" and detok.text == sp_tok.decode(ids)


def test_hf_stop_string_across_words(sp_tok):
    ids = sp_tok.encode("the quick brown fox")[1:]
    detok = sp_tok.stream_decoder(stop=["k br"])
    assert detok.push(ids[:2]) == ("the quic", False)
    assert detok.push(ids[2:]) == ("", True)
    assert detok.text == "the quic" and detok.num_tokens == 3


# ---------------------------------------------------------------------------
# (d) O(new ids) per push
# ---------------------------------------------------------------------------

class Counting:
    """Counts the ids every decode / decode_bytes call is given."""

    def __init__(self, tok, *, with_bytes: bool):
        self.tok = tok
        self.ids_decoded = 0
        if with_bytes:
            self.decode_bytes = self._decode_bytes

    def decode(self, ids):
        ids = list(ids)
        self.ids_decoded += len(ids)
        return self.tok.decode(ids)

    def _decode_bytes(self, ids):
        ids = list(ids)
        self.ids_decoded += len(ids)
        return self.tok.decode_bytes(ids)


def _cost(tok, ids, n, *, with_bytes):
    counting = Counting(tok, with_bytes=with_bytes)
    detok = Detokenizer(counting, stop=["never seen", "zzz"], prompt_ids=ids[:7])
    out = []
    for i in range(n):
        out.append(detok.push([ids[i % len(ids)]])[0])
    out.append(detok.flush())
    return counting.ids_decoded, "".join(out)


@pytest.mark.parametrize("kind", ["byte", "window", "hf", "invalid-bytes"])
def test_cost_is_linear(byte_tok, sp_tok, kind):
    text = "the quick 🚀 brown 中文 fox héllo wörld x😀y "
    if kind == "hf":
        tok, ids = sp_tok, sp_tok.encode(text)[1:]
    elif kind == "invalid-bytes":  # never a whole character: the window must still move on
        tok, ids = byte_tok, byte_tok.encode_bytes(b"\xff" * 10)
    else:
        tok, ids = byte_tok, split_ids(byte_tok, random.Random(4), text.encode())
    with_bytes = kind == "byte"
    small, _ = _cost(tok, ids, 1000, with_bytes=with_bytes)
    big, out = _cost(tok, ids, 2000, with_bytes=with_bytes)
    full = [ids[i % len(ids)] for i in range(2000)]
    if kind == "hf":
        assert out == tok.decode(ids[:7] + full)[len(tok.decode(ids[:7])):]
    else:
        assert out == tok.decode(full)
    # re-decoding everything would be ~n^2/2 = 2,000,000 ids; a bounded window is a few per push
    assert big <= 2000 * 2 * (2 * MAX_PENDING + 8)
    assert big < 2.2 * small


def test_ids_past_the_tokenizer_vocabulary_have_no_text():
    """A model's vocabulary padded past its tokenizer's (common in real checkpoints)
    must not crash the detokenizer, which runs on the serving engine's thread."""
    from flashjax.models.tokenizer import Tokenizer
    from flashjax.serving.detokenizer import Detokenizer

    tok = Tokenizer.train(["hello world"] * 20, 280)
    ids = tok.encode("hello")
    d = Detokenizer(tok)
    delta, stopped = d.push([ids[0], tok.vocab_size + 3, *ids[1:], tok.vocab_size])
    assert delta + d.flush() == "hello" and not stopped and d.num_tokens == len(ids) + 2
