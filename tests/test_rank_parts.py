"""Each rank holds only its part of the model: slicing a model in memory, reading only those
slices from a checkpoint and drawing only those slices from the seed give the same tensors,
and a distributed run from a checkpoint generates the single-device model's tokens."""
from __future__ import annotations

import pytest
import torch

from masep import model as model_module
from masep.checkpoint import from_pretrained
from masep.config import preset
from masep.engine import Request, generate, random_prompts
from masep.parallel.launch import spawn
from masep.parallel.parts import apply_parts, rank_parts
from masep.parallel.worker import RunSpec, load_model, run_rank
from masep.plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan
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


# tiny has 8 heads over 2 KV heads and 8 experts: separated 1x3+2 splits heads 3/3/2 (slices
# straddle KV groups) and experts 4/4; tp2xpp2 splits heads and expert columns over 2 ranks and
# layers over 2 stages; ep3 splits experts 3/3/2. The Qwen-like variant adds the biases, q/k
# norms and shared expert that are drawn too.
DRAW_CONFIGS = {"tiny": preset("tiny"),
                "tiny-qwen": preset("tiny").replace(qkv_bias=True, qk_norm=True, shared_expert_hidden=48)}


def _spy_draws(monkeypatch) -> list[int]:
    """Record the element count of every unit init_random_ draws."""
    sizes: list[int] = []
    real = model_module._Draws.__call__

    def spy(self, name, shape):
        out = real(self, name, shape)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(model_module._Draws, "__call__", spy)
    return sizes


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg_name", list(DRAW_CONFIGS))
@pytest.mark.parametrize("plan", PLANS, ids=["separated-3+2", "tp2xpp2", "ep3"])
def test_a_rank_draws_only_its_slice_with_the_whole_models_values(monkeypatch, cfg_name, plan):
    """worker.load_model on each rank of a preset equals that rank's slice of build_model(cfg,
    seed) bit for bit, allocates only the rank's parameters, and draws only its own units (plus,
    for a hidden-column slice, the rest of its experts' matrices, one at a time)."""
    cfg = DRAW_CONFIGS[cfg_name]
    sizes = _spy_draws(monkeypatch)
    whole = model_module.build_model(cfg, seed=5)
    whole_drawn, whole_numel = sum(sizes), _numel(whole)
    for rank in range(plan.world_size):
        parts = rank_parts(plan, cfg, rank)
        sizes.clear()
        mine = load_model(RunSpec(plan=plan, requests=[], config=cfg, seed=5), torch.device("cpu"), rank)
        drawn, largest = sum(sizes), max(sizes)
        expected = apply_parts(model_module.build_model(cfg, seed=5), parts).state_dict()
        got = mine.state_dict()
        assert got.keys() == expected.keys(), f"rank {rank}"
        for name in got:
            assert torch.equal(got[name], expected[name]), f"rank {rank}: {name}"
        with torch.device("meta"):
            assert _numel(mine) == _numel(model_module.MoETransformer(cfg, parts=parts)) < whole_numel
        held = [p for p in parts if p.active and p.experts]
        waste = sum(len(p.experts) * (3 * cfg.expert_hidden - 3 * len(p.hidden_cols)) * cfg.hidden_size
                    for p in held if p.hidden_cols is not None)  # gate, up, down: the other columns
        norms = sum(p.numel() for n, p in mine.named_parameters() if n.endswith("norm.weight"))
        assert drawn == _numel(mine) - norms + waste < whole_drawn, f"rank {rank}"
        assert largest <= model_module.init_scratch_numel(cfg, parts), f"rank {rank}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("plan", PLANS, ids=["separated-3+2", "tp2xpp2", "ep3"])
def test_distributed_run_from_a_checkpoint_matches_single_device(tiny_checkpoint, plan):
    model, path = tiny_checkpoint("qwen2_moe")
    reqs = [Request(p, 4, seed=i) for i, p in enumerate(random_prompts(4, 6, model.cfg.vocab_size, seed=3))]
    result = spawn(plan.world_size, run_rank, RunSpec(plan=plan, requests=reqs, model_dir=str(path),
                                                      timeout_s=60, quiet=True), timeout_s=200)
    assert [o.tokens for o in result["outputs"]] == generate(LocalRuntime(model), reqs).tokens


ROLE_PLANS = [SeparatedPlan(2, 2, 2, 2), TpPpPlan(2, 2, 2), TpPpPlan(2, 1, 1), EpPlan(3, 2), SinglePlan()]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("plan", ROLE_PLANS, ids=["sep2x2+2", "tp2pp2", "tp2pp1", "ep3", "single"])
def test_runtimes_checkpoint_slicing_and_cost_model_read_one_rank_role(plan, tied):
    """plan.rank_role is what every rank builds (rank_parts -> the model and the checkpoint
    reads), what the tp_pp runtime embeds and computes logits with, and what the cost model
    charges the lm_head and the vocabulary-sized weights for. They used to disagree about which
    tp_pp ranks compute the logits: the runtime computed them on every rank of the last stage
    while every rank held the embedding and the head, and the cost model charged the head (its
    time and memory) to the last stage's TP rank 0 alone."""
    from types import SimpleNamespace

    from masep.perf import costmodel as cm
    from masep.perf.hardware import get_profile
    from masep.perf.traincost import computes_loss
    from masep.parallel.tp_pp import TpPpRuntime
    from masep.plan import rank_role
    cfg = preset("tiny").replace(tie_embeddings=tied)
    wider = cfg.replace(vocab_size=cfg.vocab_size + 100)
    work, hw = cm.Workload(batch=6, context=8), get_profile("h100")
    for rank in range(plan.world_size):
        role, parts = rank_role(plan, cfg, rank), rank_parts(plan, cfg, rank)
        with torch.device("meta"):
            model = model_module.MoETransformer(cfg, parts=parts)
            vocab_numel = _numel(model_module.MoETransformer(wider, parts=parts)) - _numel(model)
        assert (model.embed is not None) == role.has_embedding, f"rank {rank}"
        assert (model.lm_head is not None) == (model.norm is not None) == role.logits, f"rank {rank}"
        assert [i for i, b in enumerate(model.layers) if b.moe is not None] == list(role.layers)
        for i in role.layers:
            attn, experts = model.layers[i].attn, model.layers[i].moe.experts
            assert (attn.heads if attn is not None else range(0)) == role.heads
            assert tuple(experts.expert_ids if experts is not None else ()) == role.experts
        # the cost model: the lm_head's FLOPs where the role computes logits, and as many
        # vocabulary-sized bytes as the rank builds (one tensor when the head is tied to the embedding)
        head = cm.op_cost("head", -1, plan.microbatches - 1, plan, rank, cfg, work, hw)
        assert (head.flops > 0) == role.logits == computes_loss(plan, role), f"rank {rank}"
        grown = cm.rank_memory(plan, wider, rank, work, hw).weights - cm.rank_memory(plan, cfg, rank, work, hw).weights
        assert grown == vocab_numel * cm.elt_bytes(cfg), f"rank {rank}"
        if plan.strategy == "tp_pp":  # the runtime embeds and computes logits where the role says
            env = SimpleNamespace(rank=rank, device=torch.device("cpu"), timeout=None)
            runtime = TpPpRuntime(model_module.build_model(cfg, parts=parts), plan,
                                  SimpleNamespace(role=plan.role(rank)), env)
            assert (runtime.first, runtime.last) == (role.has_embedding, role.logits)
            assert rank_role(plan, cfg, runtime.logits_src).broadcasts_logits and \
                runtime.logits_src == (plan.pp - 1) * plan.tp
