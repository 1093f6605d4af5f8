"""Tokenizers, chat templates and the incremental Detokenizer (stop strings, split UTF-8)."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from masep.config import ModelConfig, preset
from masep.tokenizer import ByteTokenizer, Detokenizer, HFTokenizer, Tokenizer, load_tokenizer

SPECIALS = ["<s>", "</s>", "<|im_end|>", "<|eot|>"]  # ids 0..3 in the trained tokenizer
CORPUS = ["hello world, héllo wörld! the cat sat on the mat. café naïve"] * 10
CHATML = ("{{ bos_token }}{% if messages[0].role != 'system' and messages[0].role != 'user' %}"
          "{{ raise_exception('the first message must be system or user') }}{% endif %}"
          "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["hello world", "héllo wörld! 😀", "the cat sat on the mat.", "café naïve ✓ 日本"]


def byte_level_bpe(vocab_size: int = 300) -> RustTokenizer:
    """A small byte-level BPE (GPT-2/Qwen style): characters outside the corpus split into bytes."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # The post-processor adds BOS, as Llama's does: HFTokenizer.encode must not add a second one.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def write_json(path, doc) -> None:
    path.write_text(json.dumps(doc))


@pytest.fixture
def hf_dir(tmp_path):
    """A checkpoint-like dir: tokenizer.json, tokenizer_config.json (eos </s>, a ChatML-ish
    template) and generation_config.json whose eos list should win."""
    byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json",
               {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHATML,
                "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 3], "bos_token_id": 0})
    return tmp_path


def stream(detok: Detokenizer, ids) -> list[str]:
    """Each push's released text, then flush's; stops pushing once stopped."""
    pieces = []
    for token_id in ids:
        piece, stopped = detok.push(token_id)
        pieces.append(piece)
        if stopped:
            return pieces
    return pieces + [detok.flush()]


class PieceTokenizer(Tokenizer):
    """Token i is pieces[i]: multi-character tokens, to put stop strings inside and across them."""

    def __init__(self, pieces):
        self.pieces = pieces
        super().__init__(name="pieces", vocab_size=len(pieces), bos_token_id=None, eos_token_ids=frozenset(),
                         add_bos=False, chat_template=None, bos_token=None, eos_token=None)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


# --- ByteTokenizer -----------------------------------------------------------------------------

def test_byte_specials_depend_on_vocab_size():
    small, big = ByteTokenizer(256), ByteTokenizer(4096)
    assert (small.bos_token_id, small.eos_token_ids, small.add_bos) == (None, frozenset(), False)
    assert small.encode("hi") == [104, 105]
    assert (big.bos_token_id, big.eos_token_ids, big.add_bos) == (256, frozenset({257}), True)
    assert big.encode("hi") == [256, 104, 105]
    assert big.encode("hi", add_special_tokens=False) == [104, 105]
    # specials and ids past them (a random-weight model samples them) have no text
    assert big.decode([256, 104, 105, 257, 258, 1000, 4095]) == "hi"
    assert ByteTokenizer(258).bos_token_id is None  # no room for all three specials
    assert small.builtin and big.builtin
    with pytest.raises(ValueError, match="vocab_size=255"):
        ByteTokenizer(255)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer(4096)
    assert tok.decode(tok.encode(text)) == text


def test_byte_chat_template_renders():
    tok = ByteTokenizer(256, name="tiny")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|system|>\nBe brief.\n<|user|>\nHi\n"


# --- Detokenizer -------------------------------------------------------------------------------

def test_detok_holds_split_utf8_until_complete():
    tok = ByteTokenizer(256)
    pieces = stream(Detokenizer(tok), tok.encode("a😀é"))
    # 'a', then three bytes of the emoji held back, the emoji, then é's first byte held
    assert pieces == ["a", "", "", "", "😀", "", "é", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_detok_never_shows_replacement_char(text):
    tok = ByteTokenizer(4096)
    detok = Detokenizer(tok)
    pieces = stream(detok, tok.encode(text))
    assert "".join(pieces) == detok.text == text
    assert not any("\ufffd" in p for p in pieces)


def test_detok_stop_spanning_tokens():
    tok = ByteTokenizer(256)
    detok = Detokenizer(tok, stop=["lo w"])
    pieces = stream(detok, tok.encode("Hello world"))
    assert "".join(pieces) == detok.text == "Hel"
    assert detok.stopped and len(pieces) == len("Hello w")  # stopped on the token completing the stop
    assert pieces[2] == ""  # 'l' could begin "lo w": held until it can't


def test_detok_stop_at_very_start():
    tok = ByteTokenizer(256)
    detok = Detokenizer(tok, stop=["He"])
    assert stream(detok, tok.encode("Hello")) == ["", ""]
    assert detok.text == "" and detok.stopped


def test_detok_earliest_stop_wins():
    tok = PieceTokenizer(["Hel", "lo wor", "ld"])
    detok = Detokenizer(tok, stop=["world", "lo"])
    assert stream(detok, [0, 1, 2]) == ["He", "l"]  # "lo" (earlier in the text) wins over "world"
    assert detok.text == "Hel"


def test_detok_text_after_stop_never_shown():
    tok = PieceTokenizer(["abc", "def", "ghi"])
    detok = Detokenizer(tok, stop=["b"])
    assert detok.push(0) == ("a", True)
    assert detok.push(1) == ("", True) and detok.push(2) == ("", True)
    assert detok.flush() == "" and detok.text == "a"


def test_detok_flush_releases_held_text():
    tok = ByteTokenizer(256)
    detok = Detokenizer(tok, stop=["xyz"])
    pieces = stream(detok, tok.encode("abx"))
    assert pieces == ["a", "b", "", "x"] and not detok.stopped  # 'x' held as a possible "xyz"
    detok = Detokenizer(tok)
    assert stream(detok, tok.encode("😀")[:2]) == ["", "", "\ufffd"]  # cut short: shown as is


def test_detok_rejects_empty_stop():
    with pytest.raises(ValueError, match="stop\\[1\\]"):
        Detokenizer(ByteTokenizer(256), stop=["ok", ""])


def test_detok_matches_full_decode_on_random_streams():
    """Reference: decode everything, cut at the earliest stop. Inputs are valid UTF-8 with a
    text-less ids between bytes (what a 4096-vocab preset emits), sometimes more than
    Detokenizer.MAX_PENDING_TOKENS in a row: those must not cut a character short."""
    rng = random.Random(0)
    tok, alphabet = ByteTokenizer(4096), "ab é😀\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        ids = [i for b in tok.encode(text, add_special_tokens=False) for i in [b] + [300] * rng.choice([0, 0, 1, 2, 12])]
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3))]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        detok = Detokenizer(tok, stop=stops)
        pieces = stream(detok, ids)
        assert "".join(pieces) == detok.text == text[:min(hits, default=len(text))], (text, stops)
        assert detok.stopped == bool(hits)


def test_detok_releases_invalid_bytes_without_waiting_for_the_end():
    # 0x80 is a lone continuation byte: its U+FFFD is final, so it must not be held forever.
    detok = Detokenizer(ByteTokenizer(256))
    shown = "".join(detok.push(0x80)[0] for _ in range(50))
    assert shown.count("\ufffd") >= 40


def test_detok_decodes_a_small_window():
    class Counting(ByteTokenizer):
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return super().decode(ids)

    tok = Counting(4096)
    # plain text, then ids without text, then invalid bytes: none may grow the window for long
    ids = tok.encode("abc" * 1000) + [300] * 1000 + [0x80] * 1000
    detok = Detokenizer(tok, stop=["zz"])
    stream(detok, ids)
    assert detok.text.startswith("abc" * 1000) and detok.text.count("\ufffd") == 1000
    assert Counting.decoded < 30 * len(ids)  # re-decoding the whole output would be ~20M


def test_detok_prompt_context_keeps_leading_space():
    """SentencePiece-style decoders drop the leading space of a decode's first token."""
    tok = RustTokenizer(models.WordLevel({"▁The": 0, "▁capital": 1, "▁is": 2, "▁Paris": 3, "<unk>": 4},
                                         unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    hf = HFTokenizer.__new__(HFTokenizer)  # just the decode side; no files needed
    hf._tok = tok
    assert Detokenizer(hf).push(3)[0] == "Paris"
    assert Detokenizer(hf, prompt_ids=[0, 1, 2]).push(3)[0] == " Paris"


# --- HFTokenizer -------------------------------------------------------------------------------

def test_hf_encode_decode(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert not tok.builtin and tok.bos_token_id == 0 and tok.add_bos
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 0 and ids[1] != 0  # one BOS, though the post-processor adds one too
        assert tok.decode(ids) == text
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.encode("<s>hello")[:2] == [0, tok.encode("hello")[1]]  # a template's BOS is not doubled


def test_hf_generation_config_eos_wins(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.eos_token_ids == frozenset({2, 3})  # not tokenizer_config's </s> (id 1)
    assert tok.eos_token == "</s>"  # the template's eos_token text still comes from tokenizer_config
    (hf_dir / "generation_config.json").unlink()
    assert HFTokenizer(hf_dir).eos_token_ids == frozenset({1})
    write_json(hf_dir / "tokenizer_config.json", {"bos_token": {"content": "<s>"}})
    write_json(hf_dir / "config.json", {"eos_token_id": 3})
    tok = HFTokenizer(hf_dir)
    assert tok.eos_token_ids == frozenset({3}) and tok.bos_token_id == 0 and tok.add_bos
    assert tok.chat_template is None


def test_hf_detokenizer_matches_decode(hf_dir):
    tok = HFTokenizer(hf_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        detok = Detokenizer(tok)
        pieces = stream(detok, ids)
        assert detok.text == "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_hf_chat_template(hf_dir):
    tok = HFTokenizer(hf_dir)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    want = "<s><|system|>Be brief.<|im_end|>\n<|user|>Hi\nthere<|im_end|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == want
    assert tok.apply_chat_template(msgs) == want + "<|assistant|>"


def test_hf_chat_template_errors(hf_dir):
    tok = HFTokenizer(hf_dir)
    with pytest.raises(ValueError, match="first message must be system or user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    bad = [({"role": "robot", "content": "x"}, "messages\\[1\\].role='robot'"),
           ({"role": "user", "content": [{"type": "image_url"}]}, "messages\\[1\\].content\\[0\\]"),
           ({"role": "user", "content": 3}, "messages\\[1\\].content"),
           ({"role": "user"}, "messages\\[1\\]: has no 'content'"),
           ("hello", "messages\\[1\\]: must be an object")]
    for message, match in bad:
        with pytest.raises(ValueError, match=match):
            tok.apply_chat_template([{"role": "user", "content": "ok"}, message])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ValueError, match="syntax error at line 1"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; use /v1/completions"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_template_sources(hf_dir):
    write_json(hf_dir / "tokenizer_config.json",
               {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    assert HFTokenizer(hf_dir).chat_template == "D"
    (hf_dir / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    assert HFTokenizer(hf_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


def test_hf_malformed_files(hf_dir):
    (hf_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        HFTokenizer(hf_dir)
    write_json(hf_dir / "generation_config.json", {"eos_token_id": "x"})
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id='x'"):
        HFTokenizer(hf_dir)
    (hf_dir / "generation_config.json").unlink()
    write_json(hf_dir / "tokenizer_config.json", {"eos_token": "<nope>"})
    with pytest.raises(ValueError, match="'<nope>' is not in tokenizer.json"):
        HFTokenizer(hf_dir)
    (hf_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid"):
        HFTokenizer(hf_dir)


def test_hf_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    ours = HFTokenizer(hf_dir)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(ours.encode(text), skip_special_tokens=True)
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hé 😀"}]
    for gen in (True, False):
        assert ours.apply_chat_template(msgs, gen) == auto.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)


def test_hf_bos_only_in_generation_config_is_not_prepended(hf_dir):
    """Qwen-style: tokenizer_config has no BOS and its post-processor adds none, while
    generation_config names one; transformers prepends nothing, so neither may we."""
    tok = RustTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(hf_dir / "tokenizer.json"))
    write_json(hf_dir / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>"})
    ours = HFTokenizer(hf_dir)
    assert ours.bos_token_id == 0 and not ours.add_bos
    assert ours.encode("hello") == ours.encode("hello", add_special_tokens=False)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    assert ours.encode("hello") == theirs("hello")["input_ids"]


# --- load_tokenizer ----------------------------------------------------------------------------

def test_load_tokenizer_choices(hf_dir, tmp_path):
    tiny = preset("tiny")
    tok = load_tokenizer(None, tiny)
    assert isinstance(tok, ByteTokenizer) and tok.name == tiny.name and tok.vocab_size == 256
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    assert load_tokenizer(empty, preset("small")).builtin
    with pytest.raises(ValueError, match="no-tokenizer: no tokenizer.json"):
        load_tokenizer(empty, ModelConfig(vocab_size=100))
    assert isinstance(load_tokenizer(hf_dir, preset("small")), HFTokenizer)
    with pytest.raises(ValueError, match=f"has {HFTokenizer(hf_dir).vocab_size} ids but the model.s vocab_size=256"):
        load_tokenizer(hf_dir, tiny)
