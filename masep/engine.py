"""Generation over any `Runtime`: validate, prefill all prompts in one batch, decode, measure.

Static batching: every valid request is prefilled in one right-padded call, then the batch
decodes one token per row per step until the longest request is done. A row that finished
early keeps being fed (its position frozen at its last slot, its tokens discarded), so the
batch shape never changes and the runtime needs no re-indexing.

Nothing inside the loop waits on the device: positions live on the device and advance by
one op, `attend_len` is mirrored on the host, and on CUDA each token step records an event
that is read after one synchronize at the end. The one exception is `stop_on_eos`, which
must look at each step's tokens to know when every row is done.

Sampling is per request: each row with temperature > 0 draws from its own
`torch.Generator` seeded from the request, so its tokens depend only on its own logits and
seed, not on which other requests share the batch or which process runs it.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import ModelConfig
from .metrics import Metrics, RequestOutput, compute_metrics
from .runtime import Runtime


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: drawn from torch's global RNG (reproducible under torch.manual_seed)


@dataclass
class GenerationResult:
    outputs: list[RequestOutput]  # one per request, in request order
    metrics: Metrics

    @property
    def tokens(self) -> list[list[int]]:
        return [o.tokens for o in self.outputs]

    def to_dict(self) -> dict:
        return dict(**self.metrics.to_dict(), tokens=self.tokens, errors=[o.error for o in self.outputs],
                    per_request=[o.to_dict() for o in self.outputs])


def validate_request(req: Request, cfg: ModelConfig) -> None:
    """Raise ValueError naming the value and the rule it breaks; return None for a good request."""
    if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={req.max_new_tokens!r}: must be an integer >= 1")
    if len(req.prompt) == 0:
        raise ValueError("prompt is empty: a request needs at least one prompt token")
    for i, tok in enumerate(req.prompt):
        if not isinstance(tok, numbers.Integral) or not 0 <= tok < cfg.vocab_size:
            raise ValueError(f"prompt[{i}]={tok!r}: token ids must be integers in [0, vocab_size={cfg.vocab_size})")
    total = len(req.prompt) + req.max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt length {len(req.prompt)} + max_new_tokens {req.max_new_tokens} = {total} "
                         f"exceeds max_seq_len={cfg.max_seq_len}")
    if not req.temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={req.temperature!r}: must be >= 0 (0 = greedy)")
    if not 0 < req.top_p <= 1:
        raise ValueError(f"top_p={req.top_p!r}: must be in (0, 1] (1 = off)")
    if not isinstance(req.top_k, int) or req.top_k < 0:
        raise ValueError(f"top_k={req.top_k!r}: must be an integer >= 0 (0 = off)")


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `prompt_len` uniform token ids, a pure function of the arguments."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen).tolist()


# --- sampling ------------------------------------------------------------------------------
def mask_top_k_top_p(logits_RV: torch.Tensor, top_k_R: torch.Tensor, top_p_R: torch.Tensor) -> torch.Tensor:
    """Logits with tokens outside each row's top-k (0 = off), then outside its top-p nucleus
    (1 = off), set to -inf. Top-k applies first and top-p sees the renormalised rest (vLLM's order)."""
    sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=True)
    rank_V = torch.arange(logits_RV.shape[-1], device=logits_RV.device)
    k_R1, p_R1 = top_k_R[:, None], top_p_R[:, None]
    drop_RV = (k_R1 > 0) & (rank_V >= k_R1)
    probs_RV = sorted_RV.masked_fill(drop_RV, float("-inf")).softmax(-1)
    mass_before_RV = probs_RV.cumsum(-1) - probs_RV  # the first token always stays
    drop_RV |= (p_R1 < 1) & (mass_before_RV >= p_R1)
    return logits_RV.masked_fill(torch.zeros_like(drop_RV).scatter(-1, order_RV, drop_RV), float("-inf"))


class Sampler:
    """Next token per row: argmax for greedy rows; for the others temperature, top-k, top-p,
    then the exponential-race draw argmax(p / q), q ~ Exp(1) from the row's own generator
    (equivalent to a multinomial draw; vLLM and gpt-fast use the same trick)."""

    def __init__(self, requests: Sequence[Request], device: torch.device):
        rows = [i for i, r in enumerate(requests) if r.temperature > 0]
        sampled = [requests[i] for i in rows]
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.temperature_R1 = torch.tensor([[r.temperature] for r in sampled], dtype=torch.float32, device=device)
        self.top_k_R = torch.tensor([r.top_k for r in sampled], dtype=torch.long, device=device)
        self.top_p_R = torch.tensor([r.top_p for r in sampled], dtype=torch.float32, device=device)
        self.generators = [torch.Generator(device=device).manual_seed(_seed_of(r)) for r in sampled]

    def __call__(self, logits_BV: torch.Tensor) -> torch.Tensor:
        tokens_B = logits_BV.argmax(-1)
        if not self.generators:
            return tokens_B
        x_RV = mask_top_k_top_p(logits_BV[self.rows] / self.temperature_R1, self.top_k_R, self.top_p_R)
        probs_RV = x_RV.softmax(-1)
        v = probs_RV.shape[-1]
        q_RV = torch.stack([torch.empty(v, device=probs_RV.device).exponential_(generator=g)
                            for g in self.generators])
        tokens_B[self.rows] = (probs_RV / q_RV).argmax(-1)
        return tokens_B


def _seed_of(req: Request) -> int:
    return req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())


# --- timing --------------------------------------------------------------------------------
class Stopwatch:
    """Times of points in the loop, in seconds since `start`.

    With an injected `clock` (tests) or on CPU (kernels run synchronously) each mark calls
    the clock: once at start, once per mark, once at stop. On CUDA without a clock, a mark
    records an event; `stop` synchronizes once and reads them all.
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] | None = None):
        self.device = device
        self.use_events = clock is None and device.type == "cuda"
        self.clock = clock or time.perf_counter
        self.marks: list = []

    def start(self) -> None:
        if self.use_events:
            torch.cuda.synchronize(self.device)
            self.t0_event = torch.cuda.Event(enable_timing=True)
            self.t0_event.record()
        self.t0 = self.clock()

    def mark(self) -> None:
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(self.clock() - self.t0)

    def stop(self) -> tuple[list[float], float]:
        """(mark times, duration), in seconds since start."""
        if self.use_events:
            torch.cuda.synchronize(self.device)
            marks = [self.t0_event.elapsed_time(e) / 1e3 for e in self.marks]
        else:
            marks = list(self.marks)
        duration = self.clock() - self.t0
        return marks, max([duration, *marks])


# --- the loop ------------------------------------------------------------------------------
def generate(runtime: Runtime, requests: Sequence[Request], *, stop_on_eos: bool = False,
             clock: Callable[[], float] | None = None, pad_id: int = 0) -> GenerationResult:
    """Run every valid request to completion; a rejected request gets its error in its output
    and the others still run. The clock starts after the KV cache is allocated (a server does
    that once at start-up) and before the prompts are copied to the device."""
    cfg = runtime.cfg
    if stop_on_eos and cfg.eos_token_id is None:
        raise ValueError("stop_on_eos=True but the model config has eos_token_id=None")
    outputs = [RequestOutput(prompt_len=len(r.prompt)) for r in requests]
    valid = []
    for i, req in enumerate(requests):
        try:
            validate_request(req, cfg)
            valid.append(i)
        except ValueError as err:
            outputs[i].error = str(err)
    if not valid:
        return GenerationResult(outputs, compute_metrics(outputs, 0.0))

    batch = [requests[i] for i in valid]
    eos = cfg.eos_token_id if stop_on_eos else None
    watch = Stopwatch(runtime.device, clock)
    runtime.start(len(batch), max(len(r.prompt) + r.max_new_tokens for r in batch))
    try:
        tokens_BN = _run_batch(runtime, batch, Sampler(batch, runtime.device), watch, eos, pad_id)
        marks, duration = watch.stop()
    finally:
        runtime.finish()

    for i, req, row in zip(valid, batch, tokens_BN.tolist()):
        row = row[:req.max_new_tokens]
        if eos is not None and eos in row:
            row, outputs[i].finish_reason = row[:row.index(eos) + 1], "stop"
        else:
            outputs[i].finish_reason = "length"
        outputs[i].tokens, outputs[i].token_times_s = row, marks[:len(row)]
    return GenerationResult(outputs, compute_metrics(outputs, duration))


def _run_batch(runtime: Runtime, batch: list[Request], sample: Sampler, watch: Stopwatch,
               eos: int | None, pad_id: int) -> torch.Tensor:
    """Prefill + decode; returns the generated tokens [B, max new] (rows past their own
    max_new_tokens hold filler). Marks the stopwatch once per token step."""
    dev = runtime.device
    lens = [len(r.prompt) for r in batch]
    news = [r.max_new_tokens for r in batch]
    ids_BT = torch.full((len(batch), max(lens)), pad_id, dtype=torch.long)
    for b, req in enumerate(batch):
        ids_BT[b, :lens[b]] = torch.tensor(req.prompt)
    lens_B = torch.tensor(lens)
    last_B = lens_B + torch.tensor(news) - 1  # a finished row keeps writing this (unused) slot

    watch.start()
    lens_B, last_B = lens_B.to(dev), last_B.to(dev)
    tokens_B = sample(runtime.prefill(ids_BT.to(dev), lens_B))
    out_BN = torch.full((len(batch), max(news)), pad_id, dtype=torch.long, device=dev)
    out_BN[:, 0] = tokens_B
    watch.mark()
    positions_B, host_positions = lens_B, list(lens)  # where the token fed next goes
    done = [n == 1 for n in news]
    for step in range(1, max(news)):
        if eos is not None:  # the one host sync per step, paid only when asked for
            hit = (tokens_B == eos).tolist()
            done = [d or h or step >= n for d, h, n in zip(done, hit, news)]
            if all(done):
                break
        logits_BV = runtime.decode(tokens_B, positions_B, attend_len=max(host_positions) + 1)
        tokens_B = sample(logits_BV)
        out_BN[:, step] = tokens_B
        watch.mark()
        positions_B = torch.minimum(positions_B + 1, last_B)
        host_positions = [min(p + 1, n + l - 1) for p, n, l in zip(host_positions, news, lens)]
    return out_BN.cpu()
