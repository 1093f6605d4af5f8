"""Model features through every strategy (shared expert, q/k/v bias, q/k norm, unnormalised
top-k), and a bad request among good ones: it gets its own error, the others complete.

Tolerance: greedy tokens must be identical (fp32; see test_separated.py for why reordered sums
cannot flip an argmax on these models)."""
from __future__ import annotations

import pytest

from masep.config import preset
from masep.engine import Request, generate, random_prompts
from masep.model import build_model
from masep.parallel.launch import spawn
from masep.parallel.worker import RunSpec, run_rank
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan
from masep.runtime import LocalRuntime

# Qwen2-MoE-like (shared expert with sigmoid gate, q/k/v bias) plus Qwen3-MoE's q/k RMSNorm.
QWENISH = preset("tiny").replace(name="qwenish", num_experts=8, shared_expert_hidden=32, qkv_bias=True,
                                 qk_norm=True, norm_topk_prob=False, max_seq_len=64)


def _requests():
    prompts = random_prompts(5, 6, QWENISH.vocab_size, seed=11)
    reqs = [Request(p, 3, seed=i) for i, p in enumerate(prompts)]
    reqs[2] = Request(prompts[2][:3] + [QWENISH.vocab_size + 7], 3, seed=2)  # a token outside the vocabulary
    return reqs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan", [SeparatedPlan(2, 2, 2, 2), TpPpPlan(2, 2, 2), EpPlan(3, 2)],
                         ids=["separated-2x2+2", "tp2xpp2", "ep3"])
def test_features_and_a_bad_request_through_each_strategy(plan):
    reqs = _requests()
    result = spawn(plan.world_size, run_rank, RunSpec(plan=plan, requests=reqs, config=QWENISH, seed=4,
                                                      timeout_s=60, quiet=True), timeout_s=240)
    reference = generate(LocalRuntime(build_model(QWENISH, seed=4)), reqs)
    outputs = result["outputs"]
    assert outputs[2].error is not None and "vocab_size=256" in outputs[2].error
    assert reference.outputs[2].error == outputs[2].error
    for i in (0, 1, 3, 4):
        assert outputs[i].error is None
        assert outputs[i].tokens == reference.outputs[i].tokens, f"request {i}"
    assert result["metrics"].completed == 4 and result["metrics"].failed == 1
