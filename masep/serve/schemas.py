"""Request bodies of the OpenAI-compatible API, as pydantic models.

Everything a body can get wrong that does not need the engine is checked here, so api.py
turns a `ValidationError` into one HTTP 400 naming the field. What needs the engine (token ids
below `tokenizer.vocab_size`, prompt length vs `max_model_len`) is checked by api.py / the engine.

Unknown fields are refused (extra="forbid") rather than ignored: a client that sends
`tools` expects them to act, and a silent no-op would mislead it. The OpenAI
fields we parse but do not implement are accepted only at their neutral value (`UNSUPPORTED`).
OpenAI allows at most 4 stop strings; we allow `MAX_STOP_STRINGS`, since the engine's stop
check costs little per string.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from masep.serve.engine_client import SamplingParams

MAX_STOP_STRINGS = 16

# field -> the values that mean "not used"; any other value is a 400 naming the field.
UNSUPPORTED: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False),  # completions: an int; chat: a bool
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}


def _fail(message: str, **ctx) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message, ctx)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not token 1


def _check_token_ids(ids: list) -> list[int]:
    if not ids:
        raise _fail("a token id prompt must not be empty")
    bad = [v for v in ids if not _is_token_id(v) or v < 0]
    if bad:
        raise _fail("token ids must be integers >= 0; got {bad}", bad=repr(bad[0]))
    return ids


def _check_one_prompt(value: Any) -> str | list[int]:
    if isinstance(value, str):
        if not value:
            raise _fail("a text prompt must not be empty")
        return value
    if isinstance(value, list):
        return _check_token_ids(value)
    raise _fail("each prompt must be a string or a list of token ids; got {kind}", kind=type(value).__name__)


def normalize_prompt(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes (str, [int], [str], [[int]]) as a batch of prompts."""
    if isinstance(value, str) or (isinstance(value, list) and value and _is_token_id(value[0])):
        return [_check_one_prompt(value)]
    if not isinstance(value, list) or not value:
        raise _fail("must be a non-empty string, a list of token ids, or a list of those")
    return [_check_one_prompt(v) for v in value]


class _Strict(BaseModel):
    """Unknown fields are a 400 naming them, unless null or empty: clients echo a reply back with
    `refusal: null` or `tool_calls: []`, and those ask for nothing."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_unknowns(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if k in cls.model_fields or v not in (None, [], {}, "")}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM extension; -1 and 0 both mean off
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM extension: output token ids beside the text
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as it only tags requests for OpenAI's abuse checks
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _fail("must be a string or a list of strings")
        if any(not s for s in stops):
            raise _fail("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise _fail("at most {limit} stop strings are allowed; got {num}", limit=MAX_STOP_STRINGS, num=len(stops))
        return stops

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids(cls, value: Any) -> list[int]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _fail("must be a list of token ids")
        return _check_token_ids(value) if value else []

    @field_validator(*UNSUPPORTED, mode="before", check_fields=False)
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = UNSUPPORTED[info.field_name]
        # `==` alone would let true pass as n=1 and 0 as echo=false: bools only match bools.
        same = lambda a, b: a == b and isinstance(a, bool) == isinstance(b, bool)  # noqa: E731
        if not any(same(value, v) for v in neutral):
            raise _fail("not supported by this server (allowed: {allowed}); got {value}",
                        allowed=" or ".join(json.dumps(v) for v in neutral), value=json.dumps(value)[:100])
        return value

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, stop=list(self.stop),
                              stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    # Normalized to a batch by `normalize_prompt`; the JSON may be any of OpenAI's four shapes.
    prompt: list[str | list[int]]
    max_tokens: int | None = Field(16, ge=1)  # null means the OpenAI default, 16
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_batch(cls, value: Any) -> list[str | list[int]]:
        return normalize_prompt(value)


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # OpenAI's list of text parts arrives here joined
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(_is_text_part(p) for p in value):
            return "".join(p["text"] for p in value)
        raise _fail("must be a string or a list of parts of type 'text'; images and other "
                    "part types are not supported; got {value}", value=repr(value)[:100])


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def template_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

