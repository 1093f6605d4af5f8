"""Optimizer, LR schedule, mixed precision and the memory report (masep/train/optim.py, precision.py)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from masep.config import preset
from masep.model import MoETransformer
from masep.train.optim import OptimConfig, param_groups, warmup_cosine
from masep.train.precision import MixedPrecision, format_breakdown, memory_breakdown

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def one_thread():
    # These tensors are tiny; with two OpenMP threads on a shared 2-core CI box each bf16 matmul
    # waits ~20 ms on the other thread (100x slower), so run them on one and restore afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_net(mode: str = "fp32", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 8)).to(DTYPE[mode])


# A fixed regression task: every run sees the same data, so runs differ only in arithmetic.
X = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
Y = torch.randn(256, 8, generator=torch.Generator().manual_seed(2))


def loss_of(net: nn.Module) -> torch.Tensor:
    dtype = next(net.parameters()).dtype
    return ((net(X.to(dtype)).float() - Y) ** 2).mean()


def train(net, mp: MixedPrecision, steps: int, norm_sq_fn=None) -> list:
    results = []
    for _ in range(steps):
        mp.zero_grad()
        (loss_of(net) * mp.loss_scale()).backward()
        results.append(mp.step(None, norm_sq_fn) if norm_sq_fn else mp.step())
    return results


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


# --- schedule and config --------------------------------------------------------------------
def test_warmup_cosine_values():
    w, t, m = 4, 12, 0.1
    assert warmup_cosine(0, w, t, m) == 0.25  # first update already at 1/warmup
    assert warmup_cosine(2, w, t, m) == 0.75
    assert warmup_cosine(3, w, t, m) == 1.0  # last warm-up update at the full LR
    assert warmup_cosine(4, w, t, m) == 1.0  # cosine starts at 1
    assert warmup_cosine(8, w, t, m) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-12)  # halfway: mid value
    assert warmup_cosine(12, w, t, m) == pytest.approx(0.1, abs=1e-12)
    assert warmup_cosine(1000, w, t, m) == pytest.approx(0.1, abs=1e-12)  # flat after total_steps
    assert warmup_cosine(0, 0, 10, 0.0) == 1.0  # no warm-up


@pytest.mark.parametrize("args, message", [
    ((-1, 4, 12, 0.1), "step=-1"),
    ((0, -2, 12, 0.1), "warmup_steps=-2"),
    ((0, 4, 4, 0.1), "total_steps=4: must be an integer > warmup_steps=4"),
    ((0, 4, 12, 1.5), "min_lr_ratio=1.5"),
])
def test_warmup_cosine_errors(args, message):
    with pytest.raises(ValueError, match=message):
        warmup_cosine(*args)


@pytest.mark.parametrize("changes, message", [
    (dict(lr=0.0), "OptimConfig.lr=0.0"),
    (dict(betas=(0.9, 1.0)), r"OptimConfig.betas=\(0.9, 1.0\)"),
    (dict(warmup_steps=10, total_steps=5), "OptimConfig.total_steps=5"),
    (dict(max_grad_norm=0.0), "OptimConfig.max_grad_norm=0.0"),
])
def test_optim_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**changes)


def test_param_groups_split():
    cfg = preset("tiny").replace(qkv_bias=True, qk_norm=True, tie_embeddings=True)
    model = MoETransformer(cfg, device="meta")
    named = list(model.named_parameters()) + [("lm_head.weight", model.lm_head.weight)]  # tied: twice
    decay, no_decay = param_groups(named, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    decay_names = [n for n, _ in decay["params"]]
    no_decay_names = [n for n, _ in no_decay["params"]]
    assert set(no_decay_names) == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert {"layers.0.attn.q_proj.bias", "layers.0.attn.q_norm.weight", "norm.weight"} <= set(no_decay_names)
    assert {"embed.weight", "layers.0.moe.router.weight", "layers.0.moe.experts.w_up"} <= set(decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))  # the tied one once
    # The name rule: a 2-D norm weight or a bias is still exempt.
    named_2d = [("blocks.0.ln_norm.weight", torch.zeros(2, 3)), ("proj.bias", torch.zeros(2, 3)),
                ("proj.weight", torch.zeros(2, 3))]
    groups = param_groups(named_2d, 0.1)
    assert [[n for n, _ in g["params"]] for g in groups] == [["proj.weight"], ["blocks.0.ln_norm.weight", "proj.bias"]]


# --- fp32: exactly torch ----------------------------------------------------------------------
def test_fp32_matches_torch_adamw_lambdalr_clip():
    # Gradient norms run 0.45 -> 0.15 over these steps: 0.2 clips the first few and not the rest.
    cfg = OptimConfig(lr=1e-2, warmup_steps=3, total_steps=8, min_lr_ratio=0.1, max_grad_norm=0.2)
    net = make_net()
    mp = MixedPrecision(net.named_parameters(), "fp32", cfg)
    ref = make_net()
    opt = torch.optim.AdamW(param_groups(ref.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 3, 8, 0.1))
    clipped = 0
    for _ in range(10):  # through warm-up, cosine and the flat tail
        ref_lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        loss_of(ref).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        result = train(net, mp, 1)[0]
        clipped += ref_norm.item() > cfg.max_grad_norm
        assert result.ok and result.lr == ref_lr and result.scale == 1.0
        assert result.grad_norm == pytest.approx(ref_norm.item(), rel=1e-6)  # float64 sqrt of the fp32 square
        # Bit-identical: the same torch kernels in the same order (norms as clip_grad_norm_ takes them).
        for p, q in zip(net.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    assert 3 <= clipped < 10  # both paths compared: clipped and not


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_fused_path_unscales_and_clips_inside_the_kernel(mode):
    """The fused AdamW (the CUDA default) gets the loss scale and the clip factor as grad_scale
    instead of two passes over the gradients: the same updates as the foreach path, to float
    rounding (x / (s / c) vs (x / s) * c: a few ulps per step, 1e-5 relative after 6 steps)."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6, max_grad_norm=0.2)
    runs = []
    for fused in (False, True):
        net = make_net(mode)
        mp = MixedPrecision(net.named_parameters(), mode, cfg, init_scale=2.0 ** 8, fused=fused)
        results = train(net, mp, 6)
        runs.append((flat(mp.masters), [r.grad_norm for r in results], [r.scale for r in results]))
    (ref, ref_norms, ref_scales), (got, norms, scales) = runs
    assert scales == ref_scales and norms == pytest.approx(ref_norms, rel=1e-5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, flat(make_net(mode).parameters()).float(), rtol=1e-3)  # it trained
    # a planted bug fails it: the clip factor left out
    net = make_net(mode)
    mp = MixedPrecision(net.named_parameters(), mode, cfg, init_scale=2.0 ** 8, fused=True)
    mp.cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6, max_grad_norm=1e9)
    train(net, mp, 6)
    assert not torch.allclose(flat(mp.masters), ref, rtol=1e-3)


# --- bf16: why masters ------------------------------------------------------------------------
def test_bf16_masters_track_fp32_while_naive_bf16_drifts():
    cfg = OptimConfig(lr=1e-4, warmup_steps=0, total_steps=10**6)
    steps = 50
    ref = make_net("fp32")
    w0 = flat(ref.parameters())
    train(ref, MixedPrecision(ref.named_parameters(), "fp32", cfg), steps)
    w32 = flat(ref.parameters())
    net = make_net("bf16")
    mp = MixedPrecision(net.named_parameters(), "bf16", cfg)
    train(net, mp, steps)
    naive = make_net("bf16")
    opt = torch.optim.AdamW(param_groups(naive.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            eps=cfg.eps)
    for _ in range(steps):  # the same recipe with AdamW updating the bf16 weights in place
        opt.zero_grad()
        loss_of(naive).backward()
        torch.nn.utils.clip_grad_norm_(naive.parameters(), cfg.max_grad_norm)
        opt.step()
    moved = (w32 - w0).norm()
    masters_err = (flat(mp.masters) - w32).norm() / moved
    naive_err = (flat(naive.parameters()) - w32).norm() / moved
    # Masters: the only difference from the fp32 run is a bf16 forward/backward (gradients with
    # ~2^-8 relative error); Adam's update lr*m/sqrt(v) is scale-free, so that perturbs each update
    # by a few percent: measured 3.6% of the distance moved; 10% leaves room across platforms.
    assert masters_err < 0.10
    # Naive: an update of ~lr = 1e-4 is below half a bf16 ulp of any weight above ~0.03
    # (ulp = 2^-7 of the weight's power of two), so it rounds away: measured 90% of the
    # movement is lost. Require it at least 5x worse than the masters.
    assert naive_err > 0.5 and naive_err > 5 * masters_err
    assert torch.equal(flat(net.parameters()), flat(m.to(torch.bfloat16) for m in mp.masters))  # copied back


# --- non-finite steps and fp16 loss scaling ---------------------------------------------------
def snapshot(net, mp):
    return flat(net.parameters()), flat(mp.masters), mp.optimizer.param_groups[0]["lr"], mp.scheduler.last_epoch


@pytest.mark.parametrize("mode, bad", [("fp16", math.inf), ("fp16", math.nan), ("bf16", math.nan), ("fp32", math.inf)])
def test_nonfinite_grad_skips_step(mode, bad):
    net = make_net(mode)
    mp = MixedPrecision(net.named_parameters(), mode, OptimConfig(warmup_steps=2, total_steps=10))
    train(net, mp, 1)  # one clean update first, so Adam's moments are non-zero
    before = snapshot(net, mp)
    moments = flat(s["exp_avg_sq"] for s in mp.optimizer.state.values())
    scale = mp.loss_scale()
    mp.zero_grad()
    (loss_of(net) * scale).backward()
    next(net.parameters()).grad[0, 0] = bad  # an overflow in one element of one gradient
    result = mp.step()
    assert not result.ok and not math.isfinite(result.grad_norm) and result.scale == scale
    assert mp.skipped_steps == 1 and mp.num_updates == 1
    assert mp.loss_scale() == (scale / 2 if mode == "fp16" else 1.0)
    after = snapshot(net, mp)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # weights untouched
    assert after[2:] == before[2:]  # LR schedule not advanced
    assert torch.equal(flat(s["exp_avg_sq"] for s in mp.optimizer.state.values()), moments)
    assert train(net, mp, 1)[0].ok and mp.num_updates == 2  # and training goes on


def test_fp16_scale_grows_after_growth_interval_clean_steps():
    net = make_net("fp16")
    mp = MixedPrecision(net.named_parameters(), "fp16", OptimConfig(), growth_interval=3, init_scale=2.0 ** 10)
    assert [r.scale for r in train(net, mp, 7)] == [2 ** 10] * 3 + [2 ** 11] * 3 + [2 ** 12]
    mp.zero_grad()
    (loss_of(net) * mp.loss_scale()).backward()
    next(net.parameters()).grad.fill_(math.inf)
    assert not mp.step().ok and mp.loss_scale() == 2 ** 11
    # After a backoff the count restarts: 3 more clean steps to grow again, not 2.
    assert [r.scale for r in train(net, mp, 4)] == [2 ** 11] * 3 + [2 ** 12]


def test_fp16_unscale_is_exact():
    # Gradients that carry a 2^10 loss scale must give exactly the update of unscaled ones.
    cfg = OptimConfig(lr=1e-3, max_grad_norm=1e-3)  # and clip, so the norm is taken after unscaling
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).half() * 0.01
             for i, p in enumerate(make_net().parameters())]
    runs = []
    for init_scale in (1.0, 2.0 ** 10):
        net = make_net("fp16")
        mp = MixedPrecision(net.named_parameters(), "fp16", cfg, init_scale=init_scale)
        for p, g in zip(net.parameters(), grads):
            p.grad = g * init_scale  # exact in fp16: a power of two, no overflow
        result = mp.step()
        runs.append((flat(mp.masters), result))
    assert runs[0][1].ok and runs[1][1].ok and runs[0][1].grad_norm == runs[1][1].grad_norm
    assert torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0], flat(make_net("fp16").parameters()))  # it did update


def test_global_norm_comes_from_norm_sq_fn():
    cfg = OptimConfig(lr=1e-3, max_grad_norm=1.0, warmup_steps=0)  # full LR at the first update
    net, other = make_net(), make_net()
    calls = []

    def two_ranks(local_sq):  # another rank holds gradients whose squares sum to 9
        calls.append(local_sq)
        return local_sq + 9.0

    result = train(net, MixedPrecision(net.named_parameters(), "fp32", cfg), 1, two_ranks)[0]
    loss_of(other).backward()  # the same gradients, unclipped
    local = torch.nn.utils.get_total_norm([p.grad for p in other.parameters()])
    assert len(calls) == 1 and calls[0].shape == () and calls[0].dtype == torch.float32
    assert calls[0].item() == pytest.approx(local.item() ** 2, rel=1e-6)
    assert result.grad_norm == pytest.approx(math.sqrt(local.item() ** 2 + 9.0), rel=1e-6)
    # The clip used the global norm (> 3), not the local one (< 1 = max_grad_norm: no clip).
    assert local.item() < cfg.max_grad_norm
    opt = torch.optim.AdamW(param_groups(other.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    coef = cfg.max_grad_norm / (torch.sqrt(local.square() + 9.0) + 1e-6)
    torch._foreach_mul_([p.grad for p in other.parameters()], coef)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), other.parameters()))
    # Another rank's overflow skips this rank's step too, though its own gradients are finite.
    mp = MixedPrecision(other.named_parameters(), "fp32", cfg)
    assert not train(other, mp, 1, lambda s: s + math.inf)[0].ok and mp.skipped_steps == 1


# --- checkpoints ------------------------------------------------------------------------------
def run_until_saved(mode):
    net = make_net(mode)
    mp = MixedPrecision(net.named_parameters(), mode, OptimConfig(warmup_steps=2, total_steps=10),
                        growth_interval=2, init_scale=2.0 ** 8)
    train(net, mp, 4)  # scale 2^8 -> 2^10
    mp.zero_grad()
    (loss_of(net) * mp.loss_scale()).backward()
    next(net.parameters()).grad[0, 0] = math.inf  # a skipped step, so the counters and the scaler matter
    mp.step()
    train(net, mp, 1)  # scale 2^9 (not the initial one), growth_tracker 1
    return net, mp


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_state_dict_round_trip_continues_bit_identically(mode):
    net, mp = run_until_saved(mode)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "train": mp.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    expected = train(net, mp, 4)
    resumed = make_net(mode, seed=1)  # other weights: the load must overwrite everything
    if mode == "fp32":  # bf16/fp16: load_state_dict sets the model's weights from the masters
        resumed.load_state_dict(saved["model"])
    mp2 = MixedPrecision(resumed.named_parameters(), mode, OptimConfig(warmup_steps=2, total_steps=10),
                         growth_interval=2, init_scale=2.0 ** 8)
    mp2.load_state_dict(saved["train"])
    assert (mp2.num_updates, mp2.skipped_steps) == (5, 1)
    assert train(resumed, mp2, 4) == expected  # same ok, norms, scales and LRs
    assert torch.equal(flat(resumed.parameters()), flat(net.parameters()))
    assert torch.equal(flat(mp2.masters), flat(mp.masters))


def test_state_dict_layout_and_dcp_round_trip(tmp_path):
    import torch.distributed.checkpoint as dcp

    net, mp = run_until_saved("bf16")
    sd = mp.state_dict()
    names = [n for n, _ in net.named_parameters()]
    assert sorted(sd) == ["counters", "format", "masters", "mode", "optimizer", "scaler", "scheduler"]
    assert list(sd["masters"]) == names and sorted(sd["optimizer"]["state"]) == sorted(names)
    assert sd["scaler"] == {"scale": 1.0, "growth_tracker": 0} and sd["counters"] == {"num_updates": 5, "skipped_steps": 1}
    # A fresh MixedPrecision already has the full structure, so DCP loads into it in place.
    fresh = MixedPrecision(make_net("bf16", seed=1).named_parameters(), "bf16", OptimConfig(warmup_steps=2, total_steps=10))
    template = fresh.state_dict()
    assert sorted(template["optimizer"]["state"]) == sorted(names)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(sd, checkpoint_id=tmp_path, no_dist=True)
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(template, checkpoint_id=tmp_path, no_dist=True)
    fresh.load_state_dict(template)
    assert torch.equal(flat(fresh.masters), flat(mp.masters)) and fresh.num_updates == 5
    assert fresh.optimizer.param_groups[0]["lr"] == mp.optimizer.param_groups[0]["lr"]


def test_load_state_dict_rejects_other_mode_or_params():
    _, mp = run_until_saved("bf16")
    sd = mp.state_dict()
    with pytest.raises(ValueError, match="mode='bf16'.*reads format=1 mode='fp16'"):
        MixedPrecision(make_net("fp16").named_parameters(), "fp16", OptimConfig()).load_state_dict(sd)
    fewer = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['3.bias', '3.weight'\]"):
        MixedPrecision(fewer.named_parameters(), "bf16", OptimConfig()).load_state_dict(sd)
    wider = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 9)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'3.weight' is \[8, 64\] in the state dict but \[9, 64\] here"):
        MixedPrecision(wider.named_parameters(), "bf16", OptimConfig()).load_state_dict(sd)


def test_mode_must_match_param_dtype():
    with pytest.raises(ValueError, match="is torch.bfloat16 but mode='fp32'.*use mode='bf16'"):
        MixedPrecision(make_net("bf16").named_parameters(), "fp32", OptimConfig())
    with pytest.raises(ValueError, match="mode='fp8'"):
        MixedPrecision(make_net().named_parameters(), "fp8", OptimConfig())


# --- memory -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, without_grads, total, peak", [
    ("fp32", 12, 16, 16),  # 4 weights (their own masters) + 8 moments; + 4 grads
    ("bf16", 14, 16, 20),  # 2 weights + 4 master + 8 moments; + 2 grads; + 4 fp32 grads inside step()
    ("fp16", 14, 16, 20),
])
def test_memory_breakdown_bytes_per_param(mode, without_grads, total, peak):
    net = make_net(mode)
    b = memory_breakdown(net.named_parameters(), mode)
    n = sum(p.numel() for p in net.parameters())
    assert b["num_params"] == n
    assert b["total_without_grads"] == without_grads * n
    assert b["bytes_per_param"]["total_without_grads"] == without_grads
    assert (b["bytes_per_param"]["total"], b["bytes_per_param"]["peak_in_step"]) == (total, peak)
    assert b["adam_moments"] == 8 * n and b["gradients"] == b["weights"]


def test_memory_breakdown_of_paper_model_on_meta():
    model = MoETransformer(preset("paper"), device="meta")  # bf16, nothing allocated
    b = memory_breakdown(model.named_parameters(), "bf16")
    n = sum(p.numel() for p in model.parameters())
    assert b["num_params"] == n and b["total_without_grads"] == 14 * n
    table = format_breakdown(b)
    assert f"{n:,} parameters" in table and "14.00" in table and f"{14 * n / 1e9:.2f}" in table
    assert "master" not in format_breakdown(memory_breakdown(make_net().named_parameters(), "fp32"))
