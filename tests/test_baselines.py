"""TP×PP and colocated EP on real gloo processes, checked against the single-device model.

Tolerance as in test_separated.py: fp32, and the only differences are the order of sums
(TP all-reduces of partial attention and partial expert outputs, EP's per-token weighted sum
after the all-to-all): a few ulps, far below atol 1e-5 / rtol 1e-4, while a wrong shard or a
misrouted token moves logits by O(1e-2).
"""
from __future__ import annotations

import pytest

from masep.engine import generate
from masep.model import build_model
from masep.parallel.ep import EpRuntime
from masep.parallel.groups import build_ep_groups, build_tp_pp_groups, init_distributed
from masep.parallel.launch import spawn
from masep.parallel.tp_pp import TpPpRuntime
from masep.plan import EpPlan, TpPpPlan, split_evenly
from masep.runtime import LocalRuntime
from test_separated import BATCH, CFG, _compare_logits, _requests


def _check_rank(arg) -> dict:
    strategy, sizes, microbatches = arg
    env = init_distributed("cpu", timeout_s=60)
    model = build_model(CFG, seed=3)
    reqs = _requests()
    reference = generate(LocalRuntime(model), reqs).tokens
    for m in microbatches:
        if strategy == "tp_pp":
            plan = TpPpPlan(*sizes, microbatches=m).validate(CFG, env.world_size)
            groups = build_tp_pp_groups(plan, env)
            make, mine = (lambda: TpPpRuntime(model, plan, groups, env)), range(BATCH)
        else:
            plan = EpPlan(*sizes, microbatches=m).validate(CFG, env.world_size)
            groups = build_ep_groups(plan, CFG, env)
            make, mine = (lambda: EpRuntime(model, plan, groups, env)), split_evenly(BATCH, plan.ep)[env.rank]
        my_reqs = [reqs[i] for i in mine]
        _compare_logits(make(), LocalRuntime(model), my_reqs)
        tokens = generate(make(), my_reqs).tokens
        assert tokens == [reference[i] for i in mine], f"{plan}: greedy tokens differ from the single-device model"
    return {}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (1, 2)], ids=["TP2xPP2", "TP4xPP1", "TP1xPP2"])
def test_tp_pp_matches_single_device(tp, pp):
    spawn(tp * pp, _check_rank, ("tp_pp", (tp, pp), (1, 2)), timeout_s=200)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ep", [4, 3], ids=["EP4", "EP3-uneven"])
def test_ep_matches_single_device(ep):
    # EP3: 16 experts over 3 ranks (6, 5, 5); 5 sequences over 3 or 4 ranks (one EP4 rank
    # gets 1 sequence and goes idle early, still serving its experts).
    spawn(ep, _check_rank, ("ep", (ep,), (1, 2)), timeout_s=200)


def test_invalid_baseline_plans():
    with pytest.raises(ValueError, match=r"plan.tp=33.*more tensor-parallel ranks than attention heads"):
        TpPpPlan(33, 1).validate(CFG)
    with pytest.raises(ValueError, match=r"plan.pp=3.*more pipeline stages than layers"):
        TpPpPlan(1, 3).validate(CFG)
    with pytest.raises(ValueError, match=r"plan.ep=17.*more ranks than experts"):
        EpPlan(17).validate(CFG)
    with pytest.raises(ValueError, match=r"plan.microbatches=0"):
        EpPlan(2, 0).validate(CFG)
