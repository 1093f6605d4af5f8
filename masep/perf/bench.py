"""Decode benchmarks and per-rank calibration on one CUDA GPU.

Library functions (the CLI and benchmarks/bench_decode.py are thin wrappers):

- `bench_decode(preset, batch, context, ...)`: one decode point of our model through
  `masep.fastpath.GraphedLocalRuntime` -> one JSON row (below).
- `bench_hf_decode(hf_model, cfg, batch, context, ...)`: the same point through transformers'
  `MixtralForCausalLM` holding the same weights (`build_hf_mixtral`) -> one row, or a row with
  an `error` field where it fails (out of memory).
- `calibrate(shapes, ...)`: times one rank's work per layer for the plans in `shapes`
  (`standard_plan_shapes`) and returns the calibration document (below).

Method (docs/reference.md, "How numbers are measured"): random weights (`build_model`, drawn on the GPU),
the KV cache filled with random values up to `context` (no 2048-token prefill: the values
don't change the bytes a decode step reads), every row decoding at position context - 1 and
attending to `context` keys; `input_sets` different random token vectors rotate over the timed
steps so routing varies. CUDA events around each step after warm-up; median and p99.

Decode row keys: device, torch, date, timing ("cuda_events": how the times were taken), system ("masep" | "transformers"), impl, preset,
expert_matrices, batch, context, dtype, tpot_ms_median, tpot_ms_p99, tpot_ms_mean, tps
(= batch / median TPOT), floor_ms, floor_ms_expected, mbu (= floor_ms / tpot_ms_median),
bytes_read, bytes_breakdown, copy_bw_measured (bytes read + written per second of a large
device-to-device copy, measured in the same run), matmul_flops_measured (bf16 8192^3 matmul rate
measured in the same sweep; absent when not measured), experts_touched_mean (per layer, from the
routing of the timed steps), experts_touched_expected (E(1 - (1 - k/E)^B) = 16(1-(14/16)^B)),
expert_load (per layer: tokens routed to each expert, summed over the input sets),
check_rel_err (graph-replayed logits vs the eager F.grouped_mm reference, over the rows whose
routing agrees in every layer), routing_agreement (that fraction of rows), check_rel_err_all_rows,
check_graph_vs_eager (graph vs eager with the same kernels), error (failed points only).
transformers rows add `transformers` (version) and cudnn_plans ("cold" on the first pass over
the KV lengths, "warm" after), and check_rel_err = its logits vs ours at B=1.

Bytes a decode step must read (`decode_bytes`): per layer the attention weights (q, k, v, o),
the router and the two norms, the experts actually touched (count from routing), the KV cache
(batch x context keys and values); plus the final norm, the lm_head and one embedding row per
sequence. Activations are ignored (under 0.1% here).

floor_ms is `masep.perf.floor.plan_floor` of the one-GPU plan, the same function the simulator and
the README use, given this run's numbers: Rates(copy_bw_measured, matmul_flops_measured or None,
no transfers) and the experts touched counted from the routing of the timed steps; floor_ms_expected
the same with the expected count. Its bytes are the cost model's (decode_bytes above plus activation
rows and the fp32 logits written, without the embedding rows), so they differ from bytes_read by
well under 1%.

Calibration file (read by masep/perf/costmodel.py; keep it exactly so):

    {"device": str, "torch": str, "date": "yyyy-mm-dd",
     "hbm_copy_bytes_per_s": float,     # large D2D copy, bytes read + written per second
     "matmul_flops_per_s": float,       # bf16 8192^3 matmul on random data
     "measurements": [{"op": "attention" | "experts" | "step", "preset": str, "plan": str (plan notation),
                       "batch": int, "context": int, "heads": int, "experts": int,
                       "tokens": int, "bytes": int, "flops": int, "measured_ms": float}]}

`attention`: one layer of one attention rank: QKV projection, RoPE, KV write, SDPA over
`context` keys, O projection, for `heads` query heads and the full `batch`. `experts`: one
layer of one expert rank: the grouped matmuls (+activation, routing-weight scaling) of its
`experts` experts over the `tokens` rows (token-expert pairs) it receives at `batch` under
top-k routing; for TP plans each expert's hidden size is divided by the TP degree. `step`:
one rank's per-step compute (its layers of attention and/or experts, no communication).
`bytes`/`flops` are the analytic minimums of the measured work. Each op is captured in a CUDA
graph and replayed (the runtime graphs its compute too), over enough weight/cache copies to
exceed the L2 cache.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig, preset as get_preset, to_hf_dict
from ..errors import error_line
from .energy import EnergyMeter
from ..fastpath import GraphedLocalRuntime, set_expert_impl, set_fused, triton
from ..logs import add_log_arg, progress, setup_logging
from ..model import Attention, Experts, KVCache, MoETransformer, build_model, kv_heads_for
from ..options import HelpFormatter, add_config_arg, parse_args
from ..plan import SeparatedPlan, TpPpPlan, format_plan

LOG: Callable[[str], None] = lambda msg: print(msg, flush=True)  # noqa: E731
_log = logging.getLogger("masep.bench")  # the command line's progress lines (stderr; stdout gets the JSON)


# --- small helpers --------------------------------------------------------------------------
def device_meta(device: torch.device | str = "cuda") -> dict:
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"
    return {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def hardware_tag(device_name: str) -> str:
    """'h100', 'h200', 'a100', ... from torch.cuda.get_device_name()."""
    for tag in ("h200", "h100", "a100", "b200", "l40"):
        if tag in device_name.lower():
            return tag
    return device_name.lower().replace(" ", "-")[:20]


def decode_point(text: str) -> tuple[int, int]:
    """A benchmark point "BATCHxCONTEXT" (e.g. 24x2048) -> (batch, context); an argparse type."""
    batch, _, context = text.partition("x")
    if not (batch.isdigit() and context.isdigit() and int(batch) > 0 and int(context) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a point is BATCHxCONTEXT of positive integers, e.g. 24x2048")
    return int(batch), int(context)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_steps(step: Callable[[int], object], warmup: int, steps: int,
               on_timed: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of each of `steps` calls of step(i), by CUDA events, after `warmup` calls.
    `on_timed()` runs when the GPU is idle just before the first timed call (an energy reading
    starts there; the energy window then ends at the synchronisation after the last call)."""
    for i in range(warmup):
        step(i)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    torch.cuda.synchronize()
    if on_timed is not None:
        on_timed()
    for i in range(steps):
        starts[i].record()
        step(i)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_graph(fn: Callable[[], object], repeats: int = 10, replays: int = 20) -> float:
    """Median milliseconds of one call of fn, captured in a CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return percentile(times, 50)


def measure_copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20, warmup: int = 100) -> float:
    """Bytes read + written per second of a device-to-device copy of `nbytes` (median of `iters`).
    The warm-up (~0.1 s of copies) lets the clocks rise first: with 3 copies, two-GPU runs
    measured 3.8 to 4.3 TB/s on one H200 from one plan to the next."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_steps(lambda i: dst.copy_(src), warmup=warmup, steps=iters)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (percentile(times, 50) / 1e3)


def measure_matmul_flops(n: int = 8192, iters: int = 20) -> float:
    """bf16 n^3 matmul FLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = time_steps(lambda i: a @ b, warmup=3, steps=iters)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / (percentile(times, 50) / 1e3)


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- bytes and FLOPs ------------------------------------------------------------------------
def expected_experts_touched(cfg: ModelConfig, tokens: int) -> float:
    """Expected distinct experts per layer when `tokens` tokens each pick top_k of E uniformly."""
    e, k = cfg.num_experts, cfg.top_k
    return e * (1 - (1 - k / e) ** tokens)


def _elt(cfg: ModelConfig) -> int:
    return torch.finfo(cfg.torch_dtype).bits // 8


def attention_bytes_flops(cfg: ModelConfig, heads: int, kv_heads: int, batch: int, context: int):
    """One layer of attention for `heads` query heads: weights + KV read; matmul + SDPA FLOPs."""
    h, d, b = cfg.hidden_size, cfg.head_dim, _elt(cfg)
    weights = h * d * (2 * heads + 2 * kv_heads) * b
    kv = batch * context * 2 * kv_heads * d * b
    act = 2 * batch * h * b
    flops = 2 * batch * h * d * (2 * heads + 2 * kv_heads) + 4 * batch * heads * context * d
    return weights + kv + act, flops


def experts_bytes_flops(cfg: ModelConfig, touched: float, rows: int, hidden_div: int = 1):
    """One layer of experts: `touched` experts' weights (hidden / hidden_div) over `rows` rows."""
    h, i, b = cfg.hidden_size, cfg.expert_hidden // hidden_div, _elt(cfg)
    weights = touched * cfg.expert_matrices * h * i * b
    return int(weights + 2 * rows * h * b), 2 * rows * cfg.expert_matrices * h * i


def decode_bytes(cfg: ModelConfig, batch: int, context: int, touched_per_layer: float) -> dict:
    """Bytes one decode step must read, by part (see the module docstring)."""
    h, b, moe = cfg.hidden_size, _elt(cfg), cfg.num_moe_layers
    attn_w = cfg.attention_params_per_layer() * b + 2 * h * b
    parts = {
        # + the routers, shared experts and dense layers' MLPs: read whole every step
        "attention_weights": cfg.num_layers * attn_w + (moe * (cfg.router_params() + cfg.shared_expert_params())
                                                        + cfg.first_dense_layers * cfg.dense_mlp_params()) * b,
        "experts": int(moe * touched_per_layer * cfg.expert_params() * b),
        "kv_cache": cfg.num_layers * batch * context * cfg.kv_bytes_per_token_per_layer(),
        "lm_head_embedding": (cfg.vocab_size * h + batch * h + h) * b,
    }
    parts["total"] = sum(parts.values())
    return parts


def one_gpu_floor_ms(cfg: ModelConfig, batch: int, context: int, copy_bw: float, matmul_flops: float | None = None,
                     touched: float | None = None) -> float:
    """perf/floor.py's floor of one GPU's decode step at this run's measured rates (module docstring)."""
    from .costmodel import Workload
    from .floor import Rates, plan_floor
    from .hardware import PROFILES
    from ..plan import SinglePlan
    rates = Rates(copy_bw, matmul_flops, transfer_s={}, source="measured in the run (copy, matmul)")
    # the profile only lays out ranks on nodes; one GPU has no transfers and the rates are the run's
    return plan_floor(SinglePlan(), cfg, Workload(batch, context), PROFILES["h100"], rates,
                      experts_touched_per_layer=touched).seconds * 1e3


# --- our decode -----------------------------------------------------------------------------
@contextlib.contextmanager
def capture_routing(model: MoETransformer):
    """Collects each layer's expert ids [X, k] of every forward inside the block."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = [block.moe.router.register_forward_hook(
        lambda mod, inp, out, i=i: seen[i].append(out[1].detach()))
        for i, block in enumerate(model.layers)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def fill_cache_(cache: KVCache, seed: int) -> None:
    """Random keys/values (normal(0, 1), about the scale k_proj(x) has at init)."""
    gen = torch.Generator(device=cache.k[0].device).manual_seed(seed)
    for t in cache.k + cache.v:
        t.normal_(generator=gen)


def build_paper_model(preset: str, context: int, seed: int = 0) -> MoETransformer:
    cfg = get_preset(preset)
    if context > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=context)
    return build_model(cfg, seed=seed, device="cuda", dtype=cfg.torch_dtype)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def routing_check(ref_BV, got_BV, ref_ids: list[torch.Tensor], got_ids: list[torch.Tensor]) -> dict:
    """Logits error vs the eager F.grouped_mm reference, over the rows whose top-k expert sets
    agree in every layer. With random weights many routing decisions are near ties, so kernels
    that round differently (a fused RMSNorm's reduction order) flip a few of them; a flipped
    row is a different, equally valid function, not an error."""
    same = torch.ones(ref_BV.shape[0], dtype=torch.bool, device=ref_BV.device)
    for r, g in zip(ref_ids, got_ids):
        same &= (r.sort(-1).values == g.sort(-1).values).all(-1)
    out = {"routing_agreement": float(same.float().mean()), "check_rel_err_all_rows": _rel_err(got_BV, ref_BV)}
    out["check_rel_err"] = _rel_err(got_BV[same], ref_BV[same]) if bool(same.any()) else float("nan")
    return out


@torch.inference_mode()
def bench_decode(preset: str, batch: int, context: int, *, model: MoETransformer | None = None,
                 impl: str = "grouped_mm", steps: int = 100, warmup: int = 20, input_sets: int = 4,
                 copy_bw: float | None = None, seed: int = 0, log=LOG, matmul_flops: float | None = None) -> dict:
    """One decode point of our model (GraphedLocalRuntime) -> a row (module docstring).
    impl: "grouped_mm" | "triton" (expert matmuls), optionally + "+fused" (set_fused)."""
    own_model = model is None
    model = model if model is not None else build_paper_model(preset, context, seed)
    cfg = model.cfg
    copy_bw = copy_bw or measure_copy_bandwidth()
    row = {**device_meta(), "system": "masep", "impl": f"graph+{impl}", "preset": preset,
           "expert_matrices": cfg.expert_matrices, "batch": batch, "context": context,
           "dtype": str(model.dtype).replace("torch.", ""), "copy_bw_measured": copy_bw, "timing": "cuda_events"}
    runtime = GraphedLocalRuntime(model, expert_impl=None)  # kernels are set per step below
    try:
        runtime.start(batch, context)
        fill_cache_(runtime.cache, seed + 1)
        gen = torch.Generator(device="cuda").manual_seed(seed + 2)
        tokens = [torch.randint(0, cfg.vocab_size, (batch,), device="cuda", generator=gen)
                  for _ in range(input_sets)]
        positions = torch.full((batch,), context - 1, dtype=torch.long, device="cuda")
        # Eager reference with F.grouped_mm; its routing is the routing the timed steps see.
        set_expert_impl(model, "grouped_mm")
        set_fused(model, False)
        with capture_routing(model) as seen:
            refs = [model(t[:, None], positions[:, None], runtime.cache, attend_len=context)[:, 0].float()
                    for t in tokens]
        mm_impl, _, fused = impl.partition("+")
        set_expert_impl(model, mm_impl)
        set_fused(model, fused == "fused")
        with capture_routing(model) as seen_fast:  # the same kernels, eager
            eager = model(tokens[0][:, None], positions[:, None], runtime.cache, attend_len=context)[:, 0].float()
        graphed = runtime.decode(tokens[0], positions, context)
        row.update(routing_check(refs[0], graphed, [l[0] for l in seen], [l[0] for l in seen_fast]))
        row["check_graph_vs_eager"] = _rel_err(graphed, eager)
        del refs, eager, graphed
        meter = EnergyMeter(torch.device("cuda"))
        times = time_steps(lambda i: runtime.decode(tokens[i % input_sets], positions, context),
                           warmup=warmup, steps=steps, on_timed=meter.start)
        energy = meter.stop()
    finally:
        runtime.finish()
        set_expert_impl(model, "grouped_mm")
        set_fused(model, False)
        if own_model:
            del model
        free_cuda()
    loads = [torch.stack([torch.bincount(ids.flatten(), minlength=cfg.num_experts) for ids in layer]).cpu()
             for layer in seen]  # [sets, E] per layer
    touched = sum(float((l > 0).sum(1).float().mean()) for l in loads) / len(loads)
    parts = decode_bytes(cfg, batch, context, touched)
    expected = expected_experts_touched(cfg, batch)
    med = percentile(times, 50)
    row.update(tpot_ms_median=med, tpot_ms_p99=percentile(times, 99), tpot_ms_mean=sum(times) / len(times),
               tps=batch / (med / 1e3), bytes_read=parts["total"], bytes_breakdown=parts,
               experts_touched_mean=touched, experts_touched_expected=expected,
               expert_load=[l.sum(0).tolist() for l in loads], energy=energy,
               joules_per_token=energy["joules"] / (batch * steps) if "joules" in energy else None)
    if matmul_flops:
        row["matmul_flops_measured"] = matmul_flops
    row["floor_ms"] = one_gpu_floor_ms(cfg, batch, context, copy_bw, matmul_flops, touched)
    row["floor_ms_expected"] = one_gpu_floor_ms(cfg, batch, context, copy_bw, matmul_flops)
    row["mbu"] = row["floor_ms"] / med
    log(f"[masep {impl}] {preset} B={batch} ctx={context}: TPOT {med:.3f} ms (p99 "
        f"{row['tpot_ms_p99']:.3f}), floor {row['floor_ms']:.3f} ms, MBU {row['mbu']:.3f}, "
        f"touched {touched:.2f}/{cfg.num_experts} (exp {expected:.2f}), check {row['check_rel_err']:.2e} "
        f"(routing agrees {row['routing_agreement']:.3f}, all rows {row['check_rel_err_all_rows']:.2e}, "
        f"graph vs eager {row['check_graph_vs_eager']:.2e}), load L0 {row['expert_load'][0]}")
    return row


# --- the transformers peer ------------------------------------------------------------------
def set_hf_experts_impl(hf, impl: str) -> None:
    """transformers 5.x: "grouped_mm" (its default) or "eager" (a loop over the hit experts)."""
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation(impl)
    else:
        hf.config._experts_implementation = impl


def build_hf_mixtral(model: MoETransformer):
    """transformers' MixtralForCausalLM with our model's shapes and weights (SwiGLU only)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    raw = to_hf_dict(model.cfg)
    raw.pop("model_type", None)
    raw.pop("architectures", None)
    hf_cfg = MixtralConfig(**raw)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)  # build in bf16 directly: an fp32 copy would not fit
    try:
        with torch.device(model.device):
            hf = MixtralForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    copy_weights_to_hf(model, hf)
    return hf.eval()


@torch.no_grad()
def copy_weights_to_hf(model: MoETransformer, hf) -> None:
    """Ours: w_gate/w_up [E, I, H], w_down [E, H, I]. HF 5.x fused: gate_up_proj [E, 2I, H]
    (gate first), down_proj [E, H, I]; HF 4.x: experts[e].w1 (gate), w3 (up), w2 (down)."""
    hm = hf.model
    hm.embed_tokens.weight.copy_(model.embed.weight)
    hf.lm_head.weight.copy_(model.lm_head.weight)
    hm.norm.weight.copy_(model.norm.weight)
    for block, layer in zip(model.layers, hm.layers):
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.moe_norm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name).weight.copy_(getattr(block.attn, name).weight)
        moe = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
        moe.gate.weight.copy_(block.moe.router.weight)
        ours, theirs = block.moe.experts, moe.experts
        e, i, h = ours.w_up.shape
        if hasattr(theirs, "gate_up_proj"):
            gate_up = theirs.gate_up_proj
            if gate_up.shape == (e, 2 * i, h):
                gate_up[:, :i].copy_(ours.w_gate)
                gate_up[:, i:].copy_(ours.w_up)
            elif gate_up.shape == (e, h, 2 * i):
                gate_up[:, :, :i].copy_(ours.w_gate.transpose(1, 2))
                gate_up[:, :, i:].copy_(ours.w_up.transpose(1, 2))
            else:
                raise ValueError(f"unexpected HF gate_up_proj shape {tuple(gate_up.shape)}")
            down = theirs.down_proj
            down.copy_(ours.w_down if down.shape == (e, h, i) else ours.w_down.transpose(1, 2))
        else:
            for j, expert in enumerate(theirs):
                expert.w1.weight.copy_(ours.w_gate[j])
                expert.w3.weight.copy_(ours.w_up[j])
                expert.w2.weight.copy_(ours.w_down[j])


def hf_cache_from(hf, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """A DynamicCache holding copies of per-layer keys/values [B, K, S, D]."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=hf.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def hf_step(hf, tokens_B: torch.Tensor, cache) -> torch.Tensor:
    return hf(input_ids=tokens_B[:, None], past_key_values=cache, use_cache=True).logits[:, -1].float()


@torch.inference_mode()
def hf_check(model: MoETransformer, hf, context: int, seed: int = 0) -> float:
    """Relative error of HF's logits vs ours for one decode step at position context-1 with the
    same random cache (batch 1): shows the weights were copied right."""
    cache = model.new_cache(1, context)
    fill_cache_(cache, seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (1,), device=model.device)
    hf_cache = hf_cache_from(hf, [k[:, :, :context - 1] for k in cache.k], [v[:, :, :context - 1] for v in cache.v])
    theirs = hf_step(hf, tokens, hf_cache)
    ours = model(tokens[:, None], torch.full((1, 1), context - 1, device=model.device), cache,
                 attend_len=context)[:, 0].float()
    return _rel_err(theirs, ours)


@torch.inference_mode()
def bench_hf_decode(hf, cfg: ModelConfig, preset: str, batch: int, context: int, *, steps: int = 20,
                    warmup: int = 3, input_sets: int = 4, copy_bw: float, seed: int = 0, log=LOG) -> dict:
    """One decode point of transformers' Mixtral with its DynamicCache filled to context - 1
    (the cache grows by one per step: warmup + steps beyond context)."""
    import transformers

    row = {**device_meta(), "system": "transformers", "transformers": transformers.__version__,
           "impl": f"hf-attn={hf.config._attn_implementation}-experts="
                   f"{getattr(hf.config, '_experts_implementation', None)}",
           "preset": preset, "expert_matrices": cfg.expert_matrices, "batch": batch, "context": context,
           "dtype": str(hf.dtype).replace("torch.", ""), "copy_bw_measured": copy_bw, "timing": "cuda_events"}
    cache = None
    try:
        gen = torch.Generator(device="cuda").manual_seed(seed + 1)
        shape = (batch, cfg.num_kv_heads, context - 1, cfg.head_dim)
        cache = hf_cache_from(hf, [], [])
        for layer in range(cfg.num_layers):  # one layer at a time: update() copies
            k = torch.randn(shape, generator=gen, device="cuda", dtype=hf.dtype)
            v = torch.randn(shape, generator=gen, device="cuda", dtype=hf.dtype)
            cache.update(k, v, layer)
            del k, v
        tokens = [torch.randint(0, cfg.vocab_size, (batch,), device="cuda", generator=gen)
                  for _ in range(input_sets)]
        times = time_steps(lambda i: hf_step(hf, tokens[i % input_sets], cache), warmup=warmup, steps=steps)
    except Exception as err:  # out of memory above all: a row, not a crash
        row["error"] = error_line(err)
        log(f"[transformers] {preset} B={batch}: {row['error']}")
        return row
    finally:
        del cache
        free_cuda()
    expected = expected_experts_touched(cfg, batch)
    parts = decode_bytes(cfg, batch, context, expected)
    med = percentile(times, 50)
    row.update(tpot_ms_median=med, tpot_ms_p99=percentile(times, 99), tpot_ms_mean=sum(times) / len(times),
               tps=batch / (med / 1e3), bytes_read=parts["total"], bytes_breakdown=parts,
               experts_touched_expected=expected, floor_ms=one_gpu_floor_ms(cfg, batch, context, copy_bw))
    row["floor_ms_expected"] = row["floor_ms"]
    row["mbu"] = row["floor_ms"] / med
    log(f"[transformers] {preset} B={batch} ctx={context}: TPOT {med:.3f} ms (p99 {row['tpot_ms_p99']:.3f}),"
        f" floor {row['floor_ms']:.3f} ms, MBU {row['mbu']:.3f}")
    return row


# --- per-rank calibration -------------------------------------------------------------------
@dataclass(frozen=True)
class RankShape:
    """One rank's work to time. heads: query heads held (0 = none); experts: experts held
    (0 = none); hidden_div: each expert's hidden split this many ways (TP); layers: layers in
    a `step`; tokens: rows the rank's experts receive (None = sampled from top-k routing)."""

    op: str
    preset: str
    plan: str
    batch: int
    context: int
    heads: int = 0
    experts: int = 0
    hidden_div: int = 1
    layers: int = 1
    tokens: int | None = None

    def __post_init__(self):
        if self.op not in ("attention", "experts", "step"):
            raise ValueError(f"RankShape.op={self.op!r}: must be 'attention', 'experts' or 'step'")
        if self.op == "attention" and self.heads < 1 or self.op == "experts" and self.experts < 1:
            raise ValueError(f"RankShape {self}: an {self.op} op needs a positive heads/experts count")


def standard_plan_shapes(presets=("paper", "paper-swiglu"), batches=(24,), context: int = 2048) -> list[RankShape]:
    """The MA Separation paper's 12 attention + 4 expert GPUs ("sep 1x12+4 m1": 32 heads over 12 ranks = 3 or 2
    heads, full batch; 4 experts a rank) and TP8xPP2 ("tp8pp2 m1": 4 heads, 1/8 of each expert's
    hidden, 2 layers a rank), labelled in the plan notation (masep.plan.format_plan)."""
    shapes = []
    for p in presets:
        cfg = get_preset(p)
        for b in batches:
            ma = dict(preset=p, plan=format_plan(SeparatedPlan(1, 12, 4, 1)), batch=b, context=context)
            for heads in (3, 2):
                shapes += [RankShape("attention", heads=heads, **ma),
                           RankShape("step", heads=heads, layers=cfg.num_layers, **ma)]
            shapes += [RankShape("experts", experts=4, **ma), RankShape("step", experts=4, layers=cfg.num_layers, **ma)]
            tp = dict(preset=p, plan=format_plan(TpPpPlan(8, 2, 1)), batch=b, context=context, hidden_div=8)
            shapes += [RankShape("attention", heads=4, **tp), RankShape("experts", experts=cfg.num_experts, **tp),
                       RankShape("step", heads=4, experts=cfg.num_experts, layers=cfg.num_layers // 2, **tp)]
    return shapes


def rank_counts(shape: RankShape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Rows per held expert [experts]: `tokens` spread evenly if given, else sampled: `batch`
    tokens each pick top_k distinct experts uniformly; the rank holds experts 0..experts-1."""
    if shape.tokens is not None:
        counts = torch.full((shape.experts,), shape.tokens // shape.experts, dtype=torch.long)
        counts[: shape.tokens % shape.experts] += 1
        return counts
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(shape.batch, cfg.num_experts, generator=gen).topk(cfg.top_k, dim=-1).indices
    return torch.bincount(picks.flatten(), minlength=cfg.num_experts)[: shape.experts]


class _RankWork:
    """Modules and inputs for one rank's per-layer work, `copies` independent sets of them."""

    def __init__(self, shape: RankShape, cfg: ModelConfig, counts: torch.Tensor, copies: int, seed: int):
        if cfg.is_mla or cfg.first_dense_layers:
            raise ValueError(f"calibration shapes time GQA attention and MoE layers: {cfg.name} has multi-head latent "
                             "attention or dense layers (not calibrated; the cost model's rates apply)")
        dev, dt = torch.device("cuda"), cfg.torch_dtype
        gen = torch.Generator(device=dev).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dt)  # noqa: E731
        self.attn, self.experts = [], []
        b = shape.batch
        if shape.heads:
            for _ in range(copies):
                a = Attention(cfg, heads=range(shape.heads), device=dev, dtype=dt)
                for p in a.parameters():
                    p.data.copy_(rnd(*p.shape).mul_(0.02))
                self.attn.append(a)
            self.cache = KVCache.empty(copies, b, len(self.attn[0].kv_heads), shape.context, cfg.head_dim, dt, dev)
            fill_cache_(self.cache, seed)
            self.x_attn = rnd(b, 1, cfg.hidden_size)
            self.pos = torch.full((b, 1), shape.context - 1, device=dev)
        if shape.experts:
            ecfg = cfg.replace(expert_hidden=cfg.expert_hidden // shape.hidden_div)
            self.counts = counts.to(dev)
            for _ in range(copies):
                ex = Experts(ecfg, expert_ids=range(shape.experts), device=dev, dtype=dt)
                for p in ex.parameters():
                    p.data.copy_(rnd(*p.shape).mul_(0.02))
                self.experts.append(ex)
            rows = int(counts.sum())
            self.x_rows = rnd(rows, cfg.hidden_size)
            self.w_rows = torch.rand(rows, 1, generator=gen, device=dev).to(dt)

    def attention(self, i: int):
        return self.attn[i](self.x_attn, self.pos, self.cache, i, self.cache.max_len)

    def expert(self, i: int):
        return self.experts[i].forward_sorted(self.x_rows, self.counts) * self.w_rows


def _measure(shape: RankShape, impl: str, seed: int) -> dict:
    cfg = get_preset(shape.preset)
    use_a = shape.heads > 0 and shape.op in ("attention", "step")
    use_e = shape.experts > 0 and shape.op in ("experts", "step")
    a_bytes = a_flops = e_bytes = e_flops = rows = 0
    counts = torch.zeros(0, dtype=torch.long)
    if use_a:
        kv_heads = len(kv_heads_for(cfg, range(shape.heads)))
        a_bytes, a_flops = attention_bytes_flops(cfg, shape.heads, kv_heads, shape.batch, shape.context)
    if use_e:
        counts = rank_counts(shape, cfg, seed)
        rows = int(counts.sum())
        e_bytes, e_flops = experts_bytes_flops(cfg, int((counts > 0).sum()), rows, shape.hidden_div)
    # A step runs its layers once; a single op runs over enough independent copies of its
    # weights and cache that one pass streams > 4x a 50 MB L2.
    per_layer = a_bytes + e_bytes
    copies = shape.layers if shape.op == "step" else max(1, min(16, math.ceil(200e6 / max(per_layer, 1))))
    only = RankShape(shape.op, shape.preset, shape.plan, shape.batch, shape.context,
                     heads=shape.heads if use_a else 0, experts=shape.experts if use_e else 0,
                     hidden_div=shape.hidden_div, layers=shape.layers, tokens=shape.tokens)
    work = _RankWork(only, cfg, counts, copies, seed)
    for ex in work.experts:
        set_expert_impl(ex, impl)

    def run():
        for i in range(copies):
            if use_a:
                work.attention(i)
            if use_e:
                work.expert(i)

    with torch.inference_mode():
        ms = time_graph(run)
    layers = copies if shape.op == "step" else 1
    if shape.op != "step":
        ms /= copies
    del work
    free_cuda()
    return {"op": shape.op, "preset": shape.preset, "plan": shape.plan, "batch": shape.batch,
            "context": shape.context, "heads": shape.heads if use_a else 0,
            "experts": shape.experts if use_e else 0, "tokens": rows,
            "bytes": int(layers * (a_bytes + e_bytes)), "flops": int(layers * (a_flops + e_flops)),
            "measured_ms": ms}


def calibrate(shapes: list[RankShape], *, impl: str = "grouped_mm", copy_bw: float | None = None,
              matmul_flops: float | None = None, extra: list[dict] = (), seed: int = 0, log=LOG) -> dict:
    """Time each shape; return the calibration document (module docstring). `extra`:
    measurements taken elsewhere (e.g. whole-model `step` rows from bench_decode)."""
    copy_bw = copy_bw or measure_copy_bandwidth()
    matmul_flops = matmul_flops or measure_matmul_flops()
    doc = {**device_meta(), "hbm_copy_bytes_per_s": copy_bw, "matmul_flops_per_s": matmul_flops,
           "measurements": []}
    log(f"{'op':9} {'preset':12} {'plan':13} {'B':>4} {'heads':>5} {'exp':>3} {'rows':>4} "
        f"{'MB':>8} {'roofline ms':>11} {'measured ms':>11} {'ratio':>6}")
    for shape in shapes:
        m = _measure(shape, impl, seed)
        doc["measurements"].append(m)
        roof = max(m["bytes"] / copy_bw, m["flops"] / matmul_flops) * 1e3
        log(f"{m['op']:9} {m['preset']:12} {m['plan']:13} {m['batch']:4d} {m['heads']:5d} {m['experts']:3d} "
            f"{m['tokens']:4d} {m['bytes'] / 1e6:8.1f} {roof:11.4f} {m['measured_ms']:11.4f} "
            f"{m['measured_ms'] / roof:6.2f}")
    doc["measurements"].extend(extra)
    return doc


def step_measurements(rows: list[dict]) -> list[dict]:
    """Whole-model decode rows -> calibration `step` measurements of plan 'single' (the fastest
    impl at each preset and batch)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r.get("system") != "masep" or "error" in r:
            continue
        key = (r["preset"], r["batch"], r["context"])
        if key not in best or r["tpot_ms_median"] < best[key]["tpot_ms_median"]:
            best[key] = r
    out = []
    for r in best.values():
        cfg = get_preset(r["preset"])
        out.append({"op": "step", "preset": r["preset"], "plan": "single", "batch": r["batch"],
                    "context": r["context"], "heads": cfg.num_heads, "experts": cfg.num_experts,
                    "tokens": r["batch"] * cfg.top_k, "bytes": int(r["bytes_read"]),
                    "flops": int(r["batch"] * 2 * _active_params(cfg)), "measured_ms": r["tpot_ms_median"]})
    return out


def _active_params(cfg: ModelConfig) -> int:
    """Matmul weights one token uses: the active parameters less the embedding lookup and the norms."""
    return cfg.active_params() - cfg.vocab_size * cfg.hidden_size - (2 * cfg.num_layers + 1) * cfg.hidden_size


# --- reports ---------------------------------------------------------------------------------
def decode_markdown(rows: list[dict], title: str = "Decode, one GPU") -> str:
    meta = next((r for r in rows if "device" in r), {})
    lines = [f"# {title}", "",
             f"Device: {meta.get('device')}; torch {meta.get('torch')}; date {meta.get('date')}; "
             f"copy bandwidth {meta.get('copy_bw_measured', 0) / 1e12:.2f} TB/s (read + write, measured in the run).",
             "Context 2048, bf16, random weights, KV cache filled with random values (no prefill); "
             "floor = bytes a step must read (experts touched counted from routing) / copy bandwidth.", "",
             "| system | impl | preset | experts matrices | batch | TPOT median ms | p99 ms | tokens/s | floor ms | TPOT/floor | MBU | experts touched |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['impl']} | {r['preset']} | {r['expert_matrices']} | {r['batch']} | "
                         f"{r['error'][:60]} | | | | | | |")
            continue
        touched = r.get("experts_touched_mean", r.get("experts_touched_expected"))
        lines.append(f"| {r['system']} | {r['impl']} | {r['preset']} | {r['expert_matrices']} | {r['batch']} | "
                     f"{r['tpot_ms_median']:.3f} | {r['tpot_ms_p99']:.3f} | {r['tps']:.0f} | {r['floor_ms']:.3f} | "
                     f"{r['tpot_ms_median'] / r['floor_ms']:.3f} | {r['mbu']:.3f} | {touched:.2f} |")
    return "\n".join(lines) + "\n"


# --- CLI -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masep bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    what = "decode TPOT sweep of one GPU (and transformers' as a peer): one JSON document ({meta, rows}) on stdout"
    dec = sub.add_parser("decode", help=what, description=what, formatter_class=HelpFormatter)
    add_config_arg(dec)
    dec.add_argument("--preset", nargs="+", default=["paper"], metavar="PRESET", help="built-in models to time")
    dec.add_argument("--batch", type=int, nargs="+", default=[1, 8, 24, 64, 128, 256],
                     help="sequences decoding together (one point each)")
    dec.add_argument("--context", type=int, default=2048, help="KV cache length every sequence attends to")
    dec.add_argument("--impl", nargs="+", default=["grouped_mm"] + (["triton", "triton+fused"] if triton else []),
                     choices=[f"{i}{f}" for i in ("grouped_mm", "triton", "wide", "auto") for f in ("", "+fused")],
                     help="expert kernels (+fused: also the fused norm/RoPE/router kernels)")
    dec.add_argument("--steps", type=int, default=100, help="timed decode steps per point")
    dec.add_argument("--peer", action="store_true", help="also time transformers' MixtralForCausalLM (SwiGLU presets)")
    dec.add_argument("--out", metavar="FILE", default=None, help="write the document to FILE (default: stdout)")
    what = "per-rank op times of standard plans: the calibration file that --calibration and `masep calcheck` read"
    cal = sub.add_parser("calibrate", help=what, description=what, formatter_class=HelpFormatter)
    add_config_arg(cal)
    cal.add_argument("--preset", nargs="+", default=["paper", "paper-swiglu"], metavar="PRESET",
                     help="built-in models to time")
    cal.add_argument("--batch", type=int, nargs="+", default=[24], help="sequences decoding together")
    cal.add_argument("--context", type=int, default=2048, help="KV cache length every sequence attends to")
    cal.add_argument("--impl", default="grouped_mm", choices=["grouped_mm", "triton"], help="expert kernel")
    cal.add_argument("--out", metavar="FILE", default=None, help="write the calibration file to FILE (default: stdout)")
    for p in (dec, cal):
        add_log_arg(p)
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)  # --config FILE of decode / calibrate
    setup_logging(args.log_level)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.cmd == "decode":
        peer_points = sum(get_preset(p).expert_act == "swiglu" for p in args.preset) * len(args.batch) * args.peer
        total = len(args.preset) * len(args.impl) * len(args.batch) + peer_points
        _log.info("masep bench decode: presets %s, batches %s, context %d, impls %s, %d timed steps per point%s",
                  " ".join(args.preset), " ".join(map(str, args.batch)), args.context, " ".join(args.impl),
                  args.steps, ", transformers as the peer" if args.peer else "")
        with progress(total, "decode points", "point") as bar:
            rows = decode_sweep(args.preset, args.batch, args.context, args.impl, steps=args.steps, peer=args.peer,
                                log=_log.info, on_row=lambda row: bar.update(1))
        from ..report import document
        result = document("bench decode", rows, args, hardware=device_meta())
    else:
        shapes = standard_plan_shapes(args.preset, args.batch, args.context)
        _log.info("masep bench calibrate: %d per-rank ops of %s at batches %s, context %d", len(shapes),
                  " ".join(args.preset), " ".join(map(str, args.batch)), args.context)
        with progress(len(shapes), "calibration ops", "op", iterable=shapes) as bar:
            result = calibrate(bar, impl=args.impl, log=_log.info)  # the calibration file's own format
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def decode_sweep(presets, batches, context: int, impls, *, steps: int = 100, peer: bool = False,
                 hf_experts=("grouped_mm",), copy_bw: float | None = None, log=LOG, on_row=None) -> list[dict]:
    """Every (preset, impl, batch) of our model; with peer, transformers on SwiGLU presets,
    once per transformers experts implementation in `hf_experts`."""
    copy_bw = copy_bw or measure_copy_bandwidth()
    matmul_flops = measure_matmul_flops()
    rows = []

    def add(row):
        rows.append(row)
        if on_row:
            on_row(row)

    for p in presets:
        model = build_paper_model(p, context)
        for impl in impls:
            for b in batches:
                try:
                    add(bench_decode(p, b, context, model=model, impl=impl, steps=steps, copy_bw=copy_bw, log=log,
                                     matmul_flops=matmul_flops))
                except Exception as err:  # record the failure (OOM above all) and go on with the sweep
                    add({**device_meta(), "system": "masep", "impl": f"graph+{impl}", "preset": p, "batch": b,
                         "context": context, "expert_matrices": model.cfg.expert_matrices,
                         "error": error_line(err)})
                    log(f"[masep {impl}] {p} B={b}: {rows[-1]['error']}")
                    free_cuda()
        if peer and model.cfg.expert_act == "swiglu":
            hf = build_hf_mixtral(model)
            err = hf_check(model, hf, context)
            log(f"[transformers] logits vs masep, same weights and cache, B=1: rel err {err:.2e}")
            cfg = model.cfg
            del model
            free_cuda()
            # torch 2.11 runs transformers' SDPA through cuDNN, which builds a plan for every new
            # KV length (~16 ms a layer on the host): a first pass over the lengths pays it
            # ("cold"), a later pass over the same lengths does not ("warm").
            for n, hf_impl in enumerate(hf_experts):
                set_hf_experts_impl(hf, hf_impl)
                for b in batches:
                    row = bench_hf_decode(hf, cfg, p, b, context, copy_bw=copy_bw, log=log)
                    row["check_rel_err"] = err
                    row["cudnn_plans"] = "warm" if n else "cold"
                    row["impl"] += f"-{row['cudnn_plans']}"
                    add(row)
            del hf
        else:
            del model
        free_cuda()
    return rows


if __name__ == "__main__":
    sys.exit(main())
