"""Training through every plan on real gloo ranks, checked against the single-device trainer.

The oracle is SingleTrain on the whole model with the same token groups (replicas x micro-
batches: the router's auxiliary losses are per group), the same data order and the same AdamW.

Tolerance. fp32 everywhere; the distributed step adds the same products in another order
(head-parallel partial sums, expert outputs combined after the round trip, gradients summed over
replicas), which moves losses by ~1e-7 relative and gradients by a few ulps. AdamW turns a
gradient g into an update of about lr * g / (|g| + eps), so an element whose gradient is near
zero can move by up to lr on one side and not the other: after 3 steps at lr 1e-2 we measured at
most 6e-5 between the plans and the oracle. atol 1e-3 on the weights keeps 15x margin, and a
planted bug (two experts swapped) moves the weights by ~1e-2 (test_tolerance_catches_swapped_experts).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from masep.config import preset
from masep.model import build_model
from masep.parallel import training as tr
from masep.parallel.groups import DistEnv
from masep.plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan
from masep.train.assemble import gather_full_state
from masep.train.losses import LossConfig
from masep.train.optim import OptimConfig
from masep.train.trainer import TrainSpec, Trainer, launch_training

CFG = preset("tiny").replace(num_layers=2, max_seq_len=64)
LOSS_RTOL, WEIGHT_ATOL = 1e-6, 1e-3


def _windows(n=64, length=17, seed=0):
    return torch.randint(0, CFG.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def _text_windows(n=256, length=17):
    """Bytes of English text (tiny's vocabulary is 256): something a model can learn in 20 steps."""
    text = " ".join(f"the {w} of the expert ranks is {i % 7}." for i, w in enumerate(
        ["weight", "state", "load", "share", "token", "cache"] * 200)).encode()
    ids = torch.tensor(list(text[: n * (length - 1) + 1]))
    return ids.unfold(0, length, length - 1)[:n].clone()


def _spec(plan, steps=3, **kw):
    kw.setdefault("loss", LossConfig(aux_coef=0.01, z_coef=0.001))
    kw.setdefault("windows", _windows())
    return TrainSpec(plan=plan, config=CFG, steps=steps, batch_size=8, quiet=True, return_state=True, timeout_s=60,
                     optim=OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10), **kw)


def oracle(spec: TrainSpec, replicas: int, m: int, mutate=None):
    """The single-device trainer in this process: (losses, whole-model weights)."""
    model = build_model(CFG, seed=spec.seed).train()
    if mutate is not None:
        mutate(model)
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", timedelta(seconds=60))
    trainer = Trainer(spec, tr.SingleTrain(model, replicas, m), env, CFG, groups=(replicas, m))
    for _ in range(spec.steps):
        trainer.train_step()
    return [r["loss"] for r in trainer.history], gather_full_state(trainer.rank, model)


def _compare(report, expected_losses, expected_state):
    losses = [r["loss"] for r in report["history"]]
    assert losses == pytest.approx(expected_losses, rel=LOSS_RTOL)
    worst = {k: (torch.from_numpy(report["state"][k]) - v).abs().max().item() for k, v in expected_state.items()}
    bad = {k: d for k, d in worst.items() if not d <= WEIGHT_ATOL}
    assert not bad, f"weights differ from the single-device trainer: {bad}"


PLANS = {
    # two replicas, experts 2..5 held by both expert ranks (each replica uses its own holder)
    "separated-2x1+2-replicated": (SeparatedPlan(2, 1, 2, 2, placement=((0, 1, 2, 3, 4, 5), (2, 3, 4, 5, 6, 7))), 2),
    # 8 heads over 3 ranks (3, 3, 2): head slices straddle KV groups
    "separated-1x3+1-uneven": (SeparatedPlan(1, 3, 1, 2), 1),
    "ep4-two-nodes": (EpPlan(4, 2), 4),
    "tp2xpp2": (TpPpPlan(2, 2, 2), 1),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(PLANS))
def test_plan_trains_like_single_device(name):
    plan, replicas = PLANS[name]
    extra = {"gpus_per_node": 2} if name == "ep4-two-nodes" else {}  # 2 "nodes" of 2 ranks
    report = launch_training(_spec(plan, **extra))
    _compare(report, *oracle(_spec(plan), replicas, plan.microbatches))
    if plan.strategy == "ep" or plan.strategy == "separated" and plan.attn_replicas > 1:  # sums began in backward
        assert all(r["grad_sync_overlapped"] > 0 for r in report["history"])
    if extra:  # the attention weights went through reduce-scatter / all-reduce / all-gather
        assert report["grad_sync"]["0 1 2 3"].startswith("hierarchical: 2 nodes x 2 ranks"), report["grad_sync"]


def _swap_experts(model):
    with torch.no_grad():
        for w in (model.layers[0].moe.experts.w_up, model.layers[0].moe.experts.w_down):
            w[[0, 1]] = w[[1, 0]]


def test_tolerance_catches_swapped_experts():
    """The weight tolerance is tight enough: a model with two experts swapped (a misrouting bug)
    trains to weights outside it."""
    spec = _spec(SinglePlan())
    losses, state = oracle(spec, 2, 2)
    bad_losses, bad_state = oracle(spec, 2, 2, mutate=_swap_experts)
    worst = max((bad_state[k] - state[k]).abs().max().item() for k in state)
    assert worst > 10 * WEIGHT_ATOL


@pytest.mark.timeout(180)
def test_resume_equals_uninterrupted(tmp_path):
    """4 steps straight vs 2 steps, checkpoint (DCP, each rank its shards), resume for 2 more:
    the same losses bit for bit and the same weights."""
    plan = SeparatedPlan(1, 1, 1, 2)
    straight = launch_training(_spec(plan, steps=4))
    launch_training(_spec(plan, steps=2, save_dir=str(tmp_path / "ck")))
    resumed = launch_training(_spec(plan, steps=4, save_dir=str(tmp_path / "ck"), resume=True))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][2:]]
    for k, v in straight["state"].items():
        assert (resumed["state"][k] == v).all(), k


@pytest.mark.timeout(180)
def test_int8_compression_tracks_uncompressed_loss():
    """EP over two ranks: attention gradients are all-reduced in 8 bits with error feedback.
    After 20 steps the loss is within 2% of the uncompressed run's (measured: within 0.1%), and
    the wire carries about a quarter of the bytes."""
    plan = EpPlan(2, 1)
    kw = dict(steps=20, windows=_text_windows())
    plain = launch_training(_spec(plan, **kw))
    packed = launch_training(_spec(plan, grad_compression="int8", **kw))
    a, b = plain["history"][-1], packed["history"][-1]
    assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    assert a["loss"] < plain["history"][0]["loss"] - 1.0  # it trained at all
    assert b["grad_bytes_sent"] < 0.3 * b["grad_bytes_uncompressed"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_through_the_split(precision):
    """bf16 / fp16 weights with fp32 masters on a separated plan: the first loss is the fp32
    loss within bf16's resolution of the logits (~1e-2), and training goes down."""
    plan = SeparatedPlan(1, 1, 1, 2)
    low = launch_training(_spec(plan, steps=6, precision=precision, windows=_text_windows()))
    ref = oracle(_spec(plan, steps=1, windows=_text_windows()), 1, 2)[0][0]
    losses = [r["loss"] for r in low["history"]]
    assert losses[0] == pytest.approx(ref, abs=3e-2)
    assert losses[-1] < losses[0] - 0.5
    assert low["skipped_steps"] == 0


def test_export_is_the_trained_model(tmp_path):
    """--export writes an HF checkpoint whose logits are the trained weights' (masep loads it
    back exactly; transformers loads it and agrees to fp32 rounding)."""
    from masep.checkpoint import from_pretrained
    from masep.model import MoETransformer
    from masep.train.trainer import export
    spec = _spec(SinglePlan(), steps=2, windows=_text_windows(), export_dir=str(tmp_path / "out"))
    _, state = oracle(spec, 1, 1)
    export(state, CFG, spec)
    trained = MoETransformer(CFG, dtype=torch.float32)
    trained.load_state_dict(state)
    ids = _text_windows(2)[:, :12]
    expected = trained(ids)
    assert torch.equal(from_pretrained(tmp_path / "out", dtype=torch.float32)(ids), expected)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_train_cli_refuses_bad_input_before_work(capsys):
    from masep.cli import main
    for argv, words in ((["--preset", "tiny"], "257"), (["--preset", "small", "--batch-size", "0"], "--batch-size"),
                        (["--preset", "small", "--strategy", "separated", "--attn-replicas", "2", "--batch-size", "3"],
                         "multiple"), (["--preset", "small", "--resume"], "--save-dir")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--data", "/nonexistent.txt", *argv] if "257" not in words else ["train", *argv])
        assert exit_.value.code == 2
        assert words in capsys.readouterr().err


def test_training_that_cannot_fit_is_refused_before_any_rank_starts():
    """The whole `paper` model on one 141 GB GPU: 9.1 B parameters x 16 bytes of training state
    do not fit; the check names the rank and the numbers. Two layers do fit."""
    from masep.train.trainer import check_training_memory
    paper = preset("paper")
    spec = TrainSpec(plan=SinglePlan(), config=paper, windows=_windows(8, 513), batch_size=8)
    with pytest.raises(ValueError, match=r"rank 0 holds 9\.\d+ B parameters.*16 bytes per parameter"):
        check_training_memory(spec, paper, [141 * 10**9])
    check_training_memory(spec, paper.replace(num_layers=2), [141 * 10**9])
    # separated 1+1: the expert rank holds every expert (137 GB of state): fits, with a warning
    check_training_memory(TrainSpec(plan=SeparatedPlan(1, 1, 1, 2), config=paper, windows=_windows(8, 513),
                                    batch_size=8), paper, [141 * 10**9] * 2)
