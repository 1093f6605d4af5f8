"""Each rank holds only its part of the model: slicing a model in memory and reading only those
slices from a checkpoint give the same tensors, and a distributed run from a checkpoint
generates the single-device model's tokens."""
from __future__ import annotations

import pytest
import torch

from masep.checkpoint import from_pretrained
from masep.engine import Request, generate, random_prompts
from masep.parallel.launch import spawn
from masep.parallel.parts import apply_parts, rank_parts
from masep.parallel.worker import RunSpec, run_rank
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan
from masep.runtime import LocalRuntime

PLANS = [SeparatedPlan(1, 3, 2, 2), TpPpPlan(2, 2, 2), EpPlan(3, 2)]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("plan", PLANS, ids=["separated-3+2", "tp2xpp2", "ep3"])
def test_reading_a_ranks_slices_equals_slicing_the_full_model(tiny_checkpoint, model_type, plan):
    _, path = tiny_checkpoint(model_type)
    full = from_pretrained(path)
    for rank in range(plan.world_size):
        parts = rank_parts(plan, full.cfg, rank)
        read = from_pretrained(path, parts=parts).state_dict()
        sliced = apply_parts(from_pretrained(path), parts).state_dict()
        assert read.keys() == sliced.keys(), f"rank {rank}"
        for name in read:
            assert torch.equal(read[name], sliced[name]), f"rank {rank}: {name}"
    expert_rank = rank_parts(PLANS[0], full.cfg, 4)[0]
    assert expert_rank.heads is None and expert_rank.experts == (4, 5, 6, 7)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("plan", PLANS, ids=["separated-3+2", "tp2xpp2", "ep3"])
def test_distributed_run_from_a_checkpoint_matches_single_device(tiny_checkpoint, plan):
    model, path = tiny_checkpoint("qwen2_moe")
    reqs = [Request(p, 4, seed=i) for i, p in enumerate(random_prompts(4, 6, model.cfg.vocab_size, seed=3))]
    result = spawn(plan.world_size, run_rank, RunSpec(plan=plan, requests=reqs, model_dir=str(path),
                                                      timeout_s=60, quiet=True), timeout_s=200)
    assert [o.tokens for o in result["outputs"]] == generate(LocalRuntime(model), reqs).tokens
