"""The OpenAI-compatible HTTP API over an `EngineClient`: /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, so OpenAI clients
raise their usual exception classes; every bad body is a 400 naming the field (not FastAPI's
422). Streams are Server-Sent Events ending in `data: [DONE]`. A client that goes away, mid-
stream or while a non-streaming request waits, has its engine stream closed, which aborts the
request and frees its KV slot (the EngineClient contract).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from masep.serve.engine_client import (EngineClient, EngineDead, EngineOverloaded, GenerateRequest,
                                       RequestRejected, SamplingParams, TokenDelta)
from masep.serve.prom import ServerMetrics
from masep.serve.schemas import ChatCompletionRequest, CompletionRequest

DISCONNECT_POLL_S = 0.2  # how soon a vanished non-streaming client frees its engine slot
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
               500: "internal_error", 503: "service_unavailable"}
FAILED_STATUS = {"error": 500, "abort": 503}  # a stream that ends this way was not the client's fault
REFUSALS = (RequestRejected, EngineOverloaded, EngineDead)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def describe_validation_error(err: dict) -> tuple[str, str | None]:
    """One pydantic error as (message naming the field and rule, param path like messages[0].role)."""
    if err["type"] == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
    loc = [p for p in err["loc"] if p != "body"]  # FastAPI prefixes body fields with "body"
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if param is None:  # the body as a whole: not an object, or not sent as JSON
        return "request body must be a JSON object, sent with Content-Type: application/json", None
    if err["type"] in ("extra_forbidden", "missing"):
        return f"{param}: {'unknown or unsupported field' if err['type'] == 'extra_forbidden' else 'required'}", param
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "invalid_value" and "input" in err:  # our own messages already show the value
        msg += f"; got {json.dumps(err['input'], default=str)[:100]}"
    return f"{param}: {msg}", param


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def close_stream(stream: AsyncIterator) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class SSEResponse(Response):
    """Sends `events` as they come and closes them as soon as the client leaves.

    Watching `receive` for http.disconnect catches a client that leaves while no event is due
    (its request still queued); closing `events` in `finally` closes the engine stream even if
    the server reported the disconnect as a failed send instead.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        self.events, self.status_code, self.background = events, 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # adds content-type

    async def _pump(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope, receive, send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            await close_stream(self.events)
        if not pump.cancelled() and isinstance(pump.exception(), Exception) \
                and not isinstance(pump.exception(), OSError):  # OSError: the client left mid-send
            raise pump.exception()


async def unless_disconnected(request: Request, work: Awaitable) -> tuple[bool, Any]:
    """Await `work`, cancelling it if the client disconnects: (True, result) or (False, None)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return False, None
        return True, task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def gather_or_cancel(works: list[Awaitable]) -> list:
    """asyncio.gather, but the first failure cancels the rest (their engine requests abort)."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_failed(delta: TokenDelta) -> None:
    if delta.finish_reason in FAILED_STATUS:
        raise ApiError(FAILED_STATUS[delta.finish_reason], delta.error or f"request {delta.finish_reason}ed")


def usage(num_prompt: int, num_output: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output}


class Run:
    """One engine request as the API follows it: its stream and its metrics."""

    def __init__(self, api: Api, request_id: str, ids: list[int], params: SamplingParams, arrival: float,
                 want_ids: bool = False):
        self.engine, self.request_id, self.want_ids = api.engine, request_id, want_ids
        self.tracker = api.metrics.track(arrival)
        self.stream = api.engine.generate(GenerateRequest(request_id, ids, params))

    async def next(self) -> TokenDelta:
        """The next delta; a stream that ends without a finish reason is reported as an error."""
        try:
            delta = await anext(self.stream, None)
        except REFUSALS:
            self.tracker.discard()  # refused before it ran: not a finished request
            raise
        if delta is None:
            delta = TokenDelta([], "", 0, 0, "error", "the engine ended the stream without a finish reason")
        self.tracker.on_delta(delta)
        return delta

    async def release(self) -> None:
        """Close the stream, which aborts an unfinished request. Abort by id too: a stream left by
        a cancellation (CancelledError thrown into the engine) rather than aclose() must also free its slot."""
        unfinished = not self.tracker.done
        self.tracker.finish("abort")
        await close_stream(self.stream)
        if unfinished:
            await self.engine.abort(self.request_id)


class Api:
    """The endpoints' state: the engine, the name clients must ask for, metrics."""

    def __init__(self, engine: EngineClient, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.metrics = ServerMetrics(engine, model_name)
        self.created = int(time.time())

    def check_request(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        if body.stream_options is not None and not body.stream:
            raise RequestRejected("stream_options is only allowed when stream is true", "stream_options")
        self.check_ids(body.stop_token_ids, "stop_token_ids")

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.tokenizer.vocab_size
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise RequestRejected(f"{param}: token id {bad[0]} is out of range; the vocabulary has {vocab} ids", param)

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt, add_special_tokens=True)
        self.check_ids(prompt, "prompt")
        return prompt

    def tokenize_chat(self, body: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestRejected(f"model {self.model_name!r} has no chat template, so it cannot serve "
                                  "/v1/chat/completions; use /v1/completions", "messages")
        try:
            text = tok.apply_chat_template(body.template_messages(), add_generation_prompt=True)
        except ValueError as e:
            raise RequestRejected(f"messages: the chat template refused them: {e}", "messages") from e
        return tok.encode(text, add_special_tokens=False)  # the template already carries BOS

    async def collect(self, *run_args) -> tuple[str, TokenDelta, list[int]]:
        """Run a request to its end: all its text, its last delta and its token ids; ApiError if it failed."""
        run, parts, ids = Run(self, *run_args), [], []  # Run() in here: a refusal at generate() fails only this task
        try:
            while (delta := await run.next()).finish_reason is None:
                parts.append(delta.text)
                ids += delta.token_ids
            parts.append(delta.text)
            ids += delta.token_ids
        finally:
            await run.release()
        check_failed(delta)
        return "".join(parts), delta, ids

    async def events(self, run: Run, first: TokenDelta, chunk: Callable[[dict, str | None], dict],
                     text_field: str, include_usage: bool, prologue: Sequence[dict] = ()) -> AsyncIterator[bytes]:
        """SSE events of one request: `prologue`, a chunk per delta with tokens, then an error
        event or the usage chunk, then [DONE]."""
        delta = first
        try:
            for event in prologue:
                yield sse(event)
            while True:
                failed = delta.finish_reason in FAILED_STATUS
                # A chunk per step that made tokens, even if their text is still held back (an
                # incomplete UTF-8 sequence, a possible stop string) or empty: as vLLM, so a
                # client's chunk times are the token times.
                if delta.text or delta.token_ids or (delta.finish_reason and not failed):
                    fields = {text_field: delta.text}
                    if run.want_ids:
                        fields["token_ids"] = delta.token_ids
                    yield sse(chunk(fields, None if failed else delta.finish_reason))
                if delta.finish_reason is not None:
                    break
                delta = await run.next()
            if failed:
                yield sse(error_body(FAILED_STATUS[delta.finish_reason], delta.error or "request failed"))
            elif include_usage:
                totals = usage(delta.num_prompt_tokens, delta.num_output_tokens)
                yield sse({**chunk({}, None), "choices": [], "usage": totals})
            yield b"data: [DONE]\n\n"
        finally:
            await run.release()

    async def stream_response(self, request: Request, run: Run, make_events: Callable) -> Response:
        """Wait for the first delta before sending headers, so RequestRejected / EngineOverloaded /
        EngineDead still become HTTP statuses (an engine may raise them only at the first anext)."""
        try:
            connected, first = await unless_disconnected(request, run.next())
        except BaseException:
            await run.release()
            raise
        if not connected:
            await run.release()
            return Response(status_code=499)
        return SSEResponse(make_events(run, first))

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        arrival, request_id, created = time.perf_counter(), f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.check_request(body)
        prompts = [self.tokenize_prompt(p) for p in body.prompt]
        params = body.sampling_params(body.max_tokens or 16)

        def chunk(choice: dict, finish: str | None, index: int = 0) -> dict:
            choices = [{"index": index, "text": "", **choice, "logprobs": None, "finish_reason": finish}]
            extra = {"usage": None} if body.include_usage else {}
            return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices, **extra}

        if body.stream:
            if len(prompts) > 1:
                raise RequestRejected("prompt: streaming a batch of prompts is not supported; send one "
                                      "request per prompt", "prompt")
            run = Run(self, request_id, prompts[0], params, arrival, body.return_token_ids)
            return await self.stream_response(
                request, run, lambda run, first: self.events(run, first, chunk, "text", body.include_usage))
        rids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        works = [self.collect(rid, ids, params, arrival) for rid, ids in zip(rids, prompts)]
        connected, results = await unless_disconnected(request, gather_or_cancel(works))
        if not connected:
            return Response(status_code=499)
        choices = [chunk({"text": text, **_token_ids(body, ids)}, last.finish_reason, i)["choices"][0]
                   for i, (text, last, ids) in enumerate(results)]
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": choices, "usage": usage(sum(r[1].num_prompt_tokens for r in results),
                                               sum(r[1].num_output_tokens for r in results))})

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival, request_id, created = time.perf_counter(), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.check_request(body)
        ids = self.tokenize_chat(body)
        # OpenAI's default: whatever room the context leaves (the engine refuses a prompt that fills it).
        max_tokens = body.requested_max_tokens() or max(1, self.engine.max_model_len - len(ids))
        params = body.sampling_params(max_tokens)

        def chunk(delta: dict, finish: str | None) -> dict:
            extra = {"usage": None} if body.include_usage else {}
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

        if body.stream:
            role = chunk({"role": "assistant", "content": ""}, None)
            return await self.stream_response(request, Run(self, request_id, ids, params, arrival, body.return_token_ids),
                                              lambda run, first:
                                              self.events(run, first, chunk, "content", body.include_usage, [role]))
        connected, result = await unless_disconnected(request, self.collect(request_id, ids, params, arrival))
        if not connected:
            return Response(status_code=499)
        text, last, out_ids = result
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": last.finish_reason, **_token_ids(body, out_ids)}],
            "usage": usage(last.num_prompt_tokens, last.num_output_tokens)})


def _token_ids(body, ids: list[int]) -> dict:
    """vLLM's `return_token_ids` extension: the output token ids beside the text (clients and
    tests can compare tokens exactly, which text cannot show for invalid UTF-8 pieces)."""
    return {"token_ids": ids} if body.return_token_ids else {}


def error_of(exc: Exception) -> tuple[int, str, str | None, str | None]:
    """(status, message, param, code) of an exception an endpoint raised."""
    if isinstance(exc, RequestValidationError):
        return 400, *describe_validation_error(exc.errors()[0]), None
    if isinstance(exc, RequestRejected):
        return 400, str(exc), exc.param, None
    if isinstance(exc, EngineOverloaded):
        return 429, f"server overloaded, retry later: {exc}", None, None
    if isinstance(exc, EngineDead):
        return 503, f"engine unavailable: {exc}", None, None
    if isinstance(exc, ApiError):
        return exc.status, str(exc), exc.param, exc.code
    if isinstance(exc, HTTPException):  # unknown path, wrong method
        return exc.status_code, str(exc.detail), None, None
    return 500, f"internal error: {type(exc).__name__}: {exc}", None, None  # a bug; Starlette still logs it


def add_error_handlers(app: FastAPI) -> None:
    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(*error_of(exc))

    for cls in (RequestValidationError, *REFUSALS, ApiError, HTTPException, Exception):
        app.add_exception_handler(cls, on_error)


def build_app(engine: EngineClient, served_model_name: str | None = None) -> FastAPI:
    api = Api(engine, served_model_name or engine.model_name)
    # strict_content_type=False: a body sent without any Content-Type (curl users forget it) is read as JSON.
    app = FastAPI(title="masep", description="OpenAI-compatible API over the masep engine", strict_content_type=False)
    app.state.api = api
    add_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.chat(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": api.model_name, "object": "model", "created": api.created, "owned_by": "masep",
                "root": api.model_name, "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not hasattr(engine, "health"):
            return Response(status_code=200) if engine.is_healthy() else error_response(503, "engine is not healthy")
        state = engine.health()  # 200 while any unit serves (ok or degraded); restarting or dead: 503
        return JSONResponse(state, status_code=200 if state["status"] in ("ok", "degraded") else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text, content_type = api.metrics.render()
        return Response(text, media_type=content_type)

    return app
