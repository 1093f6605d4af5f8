"""A DeepSeek-V3-class checkpoint on every parallel strategy (gloo ranks), against transformers.

transformers' DeepseekV3ForCausalLM (MLA with YaRN and interleaved RoPE, one dense first layer,
grouped sigmoid routing, a shared expert) writes a tiny checkpoint; every rank reads only its
part of it (rank_parts: its heads, experts, expert and dense-MLP columns) and the strategy must
give transformers' logits (prefill, then decode steps through the compressed MLA cache) and its
greedy tokens. The single-device model is checked the same way in test_deepseek_parity.py.

  tp2pp2   heads, expert and dense-MLP columns split over 2 ranks, 2 pipeline stages
  ep2      attention whole on each rank, experts split; the dense layer runs locally
  sep1x2+1 head-parallel MLA (each rank caches the whole latent), the dense layer's MLP on the
           attention ranks with no bridge transfer, one expert rank

Tolerance as test_separated.py (fp32; sums in other orders: head-parallel partial outputs,
column-split MLPs, experts' weighted sums after the round trip), with transformers' kernels
on the other side (see test_deepseek_parity.py): atol 1e-5 / rtol 1e-4, while a wrong slice or
a misrouted token moves logits by O(1e-2) or more.
"""
from __future__ import annotations

import pytest
import torch

from masep.checkpoint import from_pretrained
from masep.config import from_hf_config
from masep.engine import Request, generate
from masep.parallel.ep import EpRuntime
from masep.parallel.groups import build_ep_groups, build_separated_groups, build_tp_pp_groups, init_distributed
from masep.parallel.launch import spawn
from masep.parallel.parts import rank_parts
from masep.parallel.separated import SeparatedAttentionRuntime, serve_experts
from masep.parallel.tp_pp import TpPpRuntime
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan, split_evenly

ATOL, RTOL = 1e-5, 1e-4
PROMPTS = [[5, 17, 99, 3, 42, 8], [11, 7, 120, 33], [64, 2, 90, 31, 77]]  # uneven: right padding
NEW = 4
PLANS = {"tp2pp2": TpPpPlan(2, 2, 2), "ep2": EpPlan(2, microbatches=2), "sep1x2+1": SeparatedPlan(1, 2, 1, 2)}


def transformers_reference(path) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens per prompt, and the logits [NEW, V] at the prompt's last token and after
    each of the first NEW - 1 greedy tokens (one forward over prompt + tokens)."""
    from test_deepseek_parity import make_hf  # here: the ranks need not import transformers
    hf = make_hf("yarn-groups-dense", path)
    tokens, logits = [], []
    with torch.no_grad():
        for p in PROMPTS:
            new = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW)[0, len(p):].tolist()
            tokens.append(new)
            logits.append(hf(torch.tensor([p + new[:-1]])).logits[0, len(p) - 1:])
    return tokens, logits


def _runtimes(plan, model, env):
    """(a maker of this rank's runtime, the prompts its unit runs), or (None, groups) on a
    separated expert rank. The groups are built once: every rank builds them together."""
    cfg = model.cfg
    if plan.strategy == "tp_pp":
        groups = build_tp_pp_groups(plan, env)
        return (lambda: TpPpRuntime(model, plan, groups, env)), range(len(PROMPTS))
    if plan.strategy == "ep":
        groups = build_ep_groups(plan, cfg, env)
        return (lambda: EpRuntime(model, plan, groups, env)), split_evenly(len(PROMPTS), plan.ep)[env.rank]
    groups = build_separated_groups(plan, cfg, env)
    if groups.role.kind == "expert":
        return None, groups
    mine = split_evenly(len(PROMPTS), plan.attn_replicas)[groups.role.replica]
    return (lambda: SeparatedAttentionRuntime(model, plan, groups, env)), mine


def _check_rank(arg) -> dict:
    path, name, want_tokens, want_logits = arg
    env = init_distributed("cpu", timeout_s=60)
    cfg = from_hf_config(path)
    plan = PLANS[name].validate(cfg, env.world_size)
    model = from_pretrained(path, parts=rank_parts(plan, cfg, env.rank))
    make, mine = _runtimes(plan, model, env)
    if make is None:  # a separated expert rank: the logits phase, then the generate phase
        serve_experts(model, plan, mine, env)
        serve_experts(model, plan, mine, env)
        return {}
    _compare_logits(make(), [PROMPTS[i] for i in mine], [want_tokens[i] for i in mine],
                    [want_logits[i] for i in mine])
    got = generate(make(), [Request(PROMPTS[i], NEW) for i in mine]).tokens
    assert got == [want_tokens[i] for i in mine], f"{name}: greedy tokens differ from transformers'"
    return {}


def _compare_logits(rt, prompts, tokens, want) -> None:
    """Prefill, then NEW - 1 decode steps feeding transformers' greedy tokens."""
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    rt.start(len(prompts), 16)
    got = rt.prefill(ids, lens)
    for step in range(NEW):
        if step:
            fed = torch.tensor([t[step - 1] for t in tokens])
            got = rt.decode(fed, lens + step - 1, int(lens.max()) + step)
        if got is not None:
            torch.testing.assert_close(got, torch.stack([w[step] for w in want]), atol=ATOL, rtol=RTOL)
    rt.finish()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(PLANS))
def test_strategy_matches_transformers(name, tmp_path):
    tokens, logits = transformers_reference(tmp_path)
    spawn(PLANS[name].world_size, _check_rank, (tmp_path, name, tokens, logits), timeout_s=100)
