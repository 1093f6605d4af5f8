"""Tokenizers: text <-> token ids, chat templates, and incremental detokenization with stop strings.

Two kinds: `ByteTokenizer`, built in, so presets (random weights, no tokenizer files) can be
served offline; and `HFTokenizer`, which reads a checkpoint dir's tokenizer.json and the JSON
files around it the way transformers does. `load_tokenizer` picks one for a model.
`Detokenizer` turns one request's output ids into text as they arrive.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.sandbox

from .files import read_json

ROLES = ("system", "user", "assistant", "tool")

# Enough for /v1/chat/completions on a preset; the role markers are plain text (bytes).
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class _TemplateRejected(ValueError):
    """raise_exception() called by a chat template: its message is the user-facing error."""


def _raise_from_template(message: str):
    raise _TemplateRejected(f"chat template rejected the messages: {message}")


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ' (it is meant for <script> tags), which
    # would put \u003c into the prompt; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Immutable sandbox: a template comes with a downloaded checkpoint, so it must not reach
    # Python internals or mutate the messages. loopcontrols: some templates use {% break %}.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_from_template
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama-3 style templates
    return env.from_string(source)


def _message_text(i: int, content) -> str:
    """A message's content as one string; a list of text parts is joined with newlines (what
    vLLM does), so templates that expect a string content work with either form."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}].content: must be a string or a list of text parts, "
                         f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError(f"messages[{i}].content[{j}]: must be {{\"type\": \"text\", \"text\": <string>}} "
                             "(only text parts are supported)")
        texts.append(part["text"])
    return "\n".join(texts)


def _checked_message(i: int, message) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content', got {type(message).__name__}")
    if message.get("role") not in ROLES:
        raise ValueError(f"messages[{i}].role={message.get('role')!r}: must be one of {', '.join(ROLES)}")
    if "content" not in message:
        raise ValueError(f"messages[{i}]: has no 'content'")
    return {**message, "content": _message_text(i, message["content"])}


class Tokenizer:
    """Shared logic; subclasses supply `_encode_text` (no specials) and `decode`."""
    builtin = False  # True for the built-in byte tokenizer, so callers can say the text is bytes

    def __init__(self, *, name: str, vocab_size: int, bos_token_id: int | None, eos_token_ids: frozenset[int],
                 add_bos: bool, chat_template: str | None, bos_token: str | None, eos_token: str | None):
        self.name = name
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self.bos_token = bos_token  # text of the specials, for chat templates
        self.eos_token = eos_token

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode_text(text)
        # A chat template usually writes bos_token into the prompt itself; a second BOS in front
        # of it is out of distribution for the model, so add one only where there is none.
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError(f"model {self.name!r} has no chat template; use /v1/completions with a plain prompt")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: must be a non-empty list of {role, content} objects")
        checked = [_checked_message(i, m) for i, m in enumerate(messages)]
        try:
            template = _compile_template(self.chat_template)
            return template.render(messages=checked, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except _TemplateRejected:
            raise
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template of {self.name!r}: syntax error at line {err.lineno}: "
                             f"{err.message}") from err
        except Exception as err:  # the template is data from the checkpoint: any failure is its problem
            raise ValueError(f"chat template of {self.name!r} failed: {type(err).__name__}: {err}") from err


class ByteTokenizer(Tokenizer):
    """ids 0..255 are UTF-8 bytes; 256/257/258 are <s>/</s>/<pad> when the vocab has room."""
    builtin = True
    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, vocab_size: int, name: str = "bytes"):
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"ByteTokenizer vocab_size={vocab_size!r}: must be an integer >= 256 "
                             "(one id per byte value)")
        specials = vocab_size > self.PAD
        super().__init__(name=name, vocab_size=vocab_size, bos_token_id=self.BOS if specials else None,
                         eos_token_ids=frozenset({self.EOS}) if specials else frozenset(), add_bos=specials,
                         chat_template=BYTE_CHAT_TEMPLATE, bos_token="<s>" if specials else None,
                         eos_token="</s>" if specials else None)

    def _encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the bytes (specials, and the rest of a preset's 4096/32000 rows) have no
        # text. A random-weight model samples them as often as bytes; giving them "" keeps
        # its output printable instead of inventing a spelling for each row.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _optional_json(path: Path) -> dict:
    """A JSON object file of a checkpoint dir, {} when absent; ValueError naming it when malformed."""
    if not path.is_file():
        return {}
    doc = read_json(path, path.name)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(doc).__name__}")
    return doc


def _token_text(value, source: str, key: str) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{source}: {key}={value!r}: must be a string, an object with 'content', or null")


def _id_list(value, source: str, key: str) -> list[int]:
    """An eos/bos id field: null, an int, or a list of ints (generation_config allows all three)."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{source}: {key}={value!r}: must be a token id or a list of token ids")
    return values


def _chat_template(model_dir: Path, tok_cfg: dict) -> str | None:
    """The template from chat_template.jinja (newer transformers save it there; it wins), else
    tokenizer_config's chat_template: a string, or a list of named ones of which we use "default"."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    value = tok_cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{model_dir / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                         "{name, template} objects")
    return value


def _token_id(tok, token: str | None, source: str) -> int | None:
    if token is None:
        return None
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{source}: special token {token!r} is not in tokenizer.json's vocabulary")
    return token_id


def _special_ids(tok, model_dir: Path, tok_cfg: dict) -> tuple[int | None, list[int], str | None, str | None]:
    """(bos id, eos ids, bos text, eos text). generation_config.json is what transformers'
    generate() stops on, so its ids win over tokenizer_config's tokens; config.json is the last
    resort. The texts, for chat templates, are tokenizer_config's, else the token of the id."""
    gen_cfg = _optional_json(model_dir / "generation_config.json")
    src_tok, src_gen = str(model_dir / "tokenizer_config.json"), str(model_dir / "generation_config.json")
    bos_text = _token_text(tok_cfg.get("bos_token"), src_tok, "bos_token")
    eos_text = _token_text(tok_cfg.get("eos_token"), src_tok, "eos_token")
    bos_ids = _id_list(gen_cfg.get("bos_token_id"), src_gen, "bos_token_id")[:1]
    bos_id = bos_ids[0] if bos_ids else _token_id(tok, bos_text, src_tok)
    eos_ids = _id_list(gen_cfg.get("eos_token_id"), src_gen, "eos_token_id")
    if not eos_ids and eos_text:
        eos_ids = [_token_id(tok, eos_text, src_tok)]
    if not eos_ids:
        model_cfg = _optional_json(model_dir / "config.json")
        eos_ids = _id_list(model_cfg.get("eos_token_id"), str(model_dir / "config.json"), "eos_token_id")
    bos_text = bos_text or (None if bos_id is None else tok.id_to_token(bos_id))
    eos_text = eos_text or (tok.id_to_token(eos_ids[0]) if eos_ids else None)
    return bos_id, eos_ids, bos_text, eos_text


class HFTokenizer(Tokenizer):
    """A checkpoint dir's tokenizer.json, with specials and template from the files beside it."""
    builtin = False

    def __init__(self, model_dir: str | Path, name: str | None = None):
        import tokenizers  # only HF checkpoints need it

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for any bad file
            raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from err
        tok_cfg = _optional_json(model_dir / "tokenizer_config.json")
        bos_id, eos_ids, bos_text, eos_text = _special_ids(self._tok, model_dir, tok_cfg)
        add_bos = tok_cfg.get("add_bos_token")
        # Ids can have gaps (added tokens placed past the model's vocab): size = largest id + 1.
        vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        super().__init__(
            name=name or model_dir.name, vocab_size=vocab_size, bos_token_id=bos_id, eos_token_ids=frozenset(eos_ids),
            add_bos=self._default_add_bos(bos_id) if add_bos is None else bool(add_bos),
            chat_template=_chat_template(model_dir, tok_cfg),
            bos_token=bos_text, eos_token=eos_text)

    def _default_add_bos(self, bos_id: int | None) -> bool:
        """Without add_bos_token in tokenizer_config.json, transformers' fast tokenizer adds BOS
        iff tokenizer.json's post-processor does; with no post-processor, assume BOS is wanted."""
        if bos_id is None:
            return False
        if self._tok.post_processor is None:
            return True
        return self._tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]

    def _encode_text(self, text: str) -> list[int]:
        # Specials are ours to add (Tokenizer.encode): the post-processor would add them again.
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as err:
            raise ValueError(f"tokenizer of {self.name!r} cannot encode the text: {err}") from err

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path | None, cfg) -> Tokenizer:
    """The tokenizer for a model: built-in bytes for a preset (model_dir None) or a checkpoint
    dir without tokenizer.json; the dir's tokenizer.json otherwise."""
    if model_dir is None:
        return ByteTokenizer(cfg.vocab_size, name=cfg.name)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model dir {model_dir}: not a directory")
    if (model_dir / "tokenizer.json").is_file():
        tok = HFTokenizer(model_dir, name=cfg.name)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{model_dir / 'tokenizer.json'}: the tokenizer has {tok.vocab_size} ids but the "
                             f"model's vocab_size={cfg.vocab_size}; its ids past the embedding would have no row")
        return tok
    if cfg.vocab_size >= 256:
        return ByteTokenizer(cfg.vocab_size, name=cfg.name)
    raise ValueError(f"model dir {model_dir}: no tokenizer.json, and vocab_size={cfg.vocab_size} is below the "
                     "256 the built-in byte tokenizer needs")


class Detokenizer:
    """Incremental text of one request's output, with stop strings (OpenAI semantics).

    Each push decodes only a small window of ids: the ids of the last released chunk (as
    context: SentencePiece decoders drop a leading space at the start of a decode, and a
    byte-level token may finish a character begun before it) plus those not yet released.
    The new text is what the window adds over its context.
    """

    # Bounds on holding text back, so a random-weight model's output (invalid bytes, ids with
    # no text) is neither held forever nor re-decoded in an ever-growing window. A UTF-8
    # character is at most 4 bytes and every token that has text carries at least one byte,
    # so text still incomplete after this many text-bearing tokens will not complete.
    MAX_PENDING_TOKENS = 8
    # Prompt ids kept as the first window's context: enough to span a word boundary or a
    # character split across tokens, few enough to keep each decode small.
    PROMPT_CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, prompt_ids: Sequence[int] = ()):
        """`prompt_ids`: optional; the prompt's last few ids are the first window's context, so
        the first output token decodes as a continuation (" Paris", not "Paris")."""
        if isinstance(stop, str):
            stop = [stop]
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}]={s!r}: stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""  # everything released so far
        self.stopped = False
        self._window = list(prompt_ids)[-self.PROMPT_CONTEXT_TOKENS:]
        self._read = len(self._window)  # window[:_read] is context, already released
        self._text_tokens = 0  # pending tokens that decode to some text on their own
        self._context_text = tokenizer.decode(self._window)
        self._held = ""  # decoded text held back as a possible start of a stop string

    def _decode_step(self, force: bool) -> str:
        """Text the window adds over its context once it is complete (force: release anyway)."""
        full = self.tokenizer.decode(self._window)
        incomplete = full.endswith("\ufffd")  # a token prefix of a multi-byte character
        ready = force or (len(full) > len(self._context_text) and not incomplete)
        if len(self._window) - self._read > self.MAX_PENDING_TOKENS:
            ready |= not incomplete or self._text_tokens > self.MAX_PENDING_TOKENS
        if not ready:
            return ""
        new = full[len(self._context_text):]
        self._window = self._window[self._read:]
        self._read, self._text_tokens = len(self._window), 0
        self._context_text = self.tokenizer.decode(self._window)
        return new

    def _release(self, new: str, final: bool) -> str:
        """Cut the text at the earliest stop string; else hold back a tail that may begin one."""
        buf = self._held + new
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = buf[:min(hits)], "", True
        else:
            keep = 0 if final else max((k for s in self.stop for k in range(1, min(len(s), len(buf) + 1))
                                        if buf.endswith(s[:k])), default=0)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new text now safe to show, stopped). After a stop, further pushes add nothing."""
        if self.stopped:
            return "", True
        self._window.append(token_id)
        self._text_tokens += bool(self.tokenizer.decode([token_id]))
        return self._release(self._decode_step(force=False), final=False), self.stopped

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string."""
        if self.stopped:
            return ""
        return self._release(self._decode_step(force=True), final=True)
