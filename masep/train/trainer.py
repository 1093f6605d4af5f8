"""`masep train`: the training loop every rank runs, whatever the plan.

Per step, on every rank: the global batch (the same deterministic Batches on every rank that
reads data), this rank's forward and backward (parallel/training.py), gradient sync over the
ranks sharing each parameter (syncer.py), one optimizer step with the global gradient norm
(precision.py), step statistics summed over the world, and on rank 0 a log line, a JSONL row
and the progress bar. Checkpoints (ckpt.py) and the HF export (assemble.py) at the end.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..parallel import train_separated as ts
from ..parallel import training as tr
from .losses import LossConfig
from .optim import OptimConfig
from .precision import MixedPrecision, memory_breakdown
from .syncer import GradSyncer, world_sum

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TrainSpec:
    """Everything a training rank needs, picklable (sent to spawned ranks)."""

    plan: object
    windows: torch.Tensor  # packed token windows [N, seq_len + 1] (data.load_corpus)
    preset: str | None = None
    config: object | None = None  # a ModelConfig drawn from the seed instead of a preset
    model_dir: str | None = None  # start from this HF checkpoint
    seed: int = 0
    precision: str = "fp32"
    steps: int = 100
    batch_size: int = 8  # sequences per global batch
    data_seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_compression: str = "none"
    gpus_per_node: int | None = None  # None: torchrun's LOCAL_WORLD_SIZE, else every rank on one node
    device: str = "cpu"
    backend: str = "auto"
    timeout_s: float = 120.0
    log_dir: str | None = None  # train.jsonl and loss.png
    save_dir: str | None = None  # torch.distributed.checkpoint directory
    save_every: int = 0  # steps between checkpoints (0: only at the end when save_dir is set)
    resume: bool = False  # continue from save_dir's latest checkpoint
    export_dir: str | None = None  # HF checkpoint of the trained weights
    tokenizer_dir: str | None = None  # copied next to the export (tokenizer.json, ...)
    quiet: bool = False
    return_state: bool = False  # rank 0 returns the whole model's weights (tests)

    def validate(self, cfg) -> "TrainSpec":
        if cfg.training_refusal():
            raise ValueError(cfg.training_refusal())
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {sorted(PRECISIONS)}")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be >= 1")
        check_batch(self.batch_size, self.plan)
        if self.windows.dim() != 2 or self.windows.shape[0] < self.batch_size:
            raise ValueError(f"the corpus packs into {self.windows.shape[0]} windows, fewer than --batch-size "
                             f"{self.batch_size}: use more text or a shorter --seq-len")
        top = int(self.windows.max()) if self.windows.numel() else 0
        if top >= cfg.vocab_size:
            raise ValueError(f"token id {top} in the data is outside the model's vocabulary ({cfg.vocab_size}): "
                             "train the tokenizer with --vocab-size <= the model's vocab_size")
        if self.windows.shape[1] - 1 > cfg.max_seq_len:
            raise ValueError(f"--seq-len {self.windows.shape[1] - 1} is longer than the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        if self.grad_compression not in ("none", "int8"):
            raise ValueError(f"--grad-compression {self.grad_compression!r}: choose 'none' or 'int8'")
        if self.resume and not self.save_dir:
            raise ValueError("--resume needs --save-dir (the checkpoint to continue from)")
        self.optim.validate()
        self.loss.validate()
        return self


def node_size(gpus_per_node: int | None, world_size: int) -> int:
    """Ranks per node for the gradient sums: the given value, else torchrun's LOCAL_WORLD_SIZE
    (its agents start one node's ranks each; ranks are numbered node by node), else all ranks."""
    import os
    if gpus_per_node is not None:
        return gpus_per_node
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else max(1, world_size)


def check_batch(batch_size: int, plan) -> None:
    """Every replica gets an equal share with at least one sequence per micro-batch."""
    replicas, m = data_replicas(plan), getattr(plan, "microbatches", 1)
    if batch_size < 1 or batch_size % replicas or batch_size // replicas < m:
        raise ValueError(f"--batch-size {batch_size}: must be a multiple of the plan's {replicas} data-parallel "
                         f"replica(s) with at least {m} sequence(s) (one per micro-batch) each")


def data_replicas(plan) -> int:
    """How many data-parallel replicas split a global batch under `plan`."""
    return {"separated": getattr(plan, "attn_replicas", 1), "ep": getattr(plan, "ep", 1)}.get(plan.strategy, 1)


def build_train_rank(plan, model, env) -> tr.TrainRank:
    """This rank's part of the model and its step, for any strategy (builds its groups)."""
    from ..parallel.groups import build_ep_groups, build_separated_groups, build_tp_pp_groups
    if plan.strategy == "single":
        return tr.SingleTrain(model, 1, plan.microbatches)
    if plan.strategy == "separated":
        groups = build_separated_groups(plan, model.cfg, env)
        cls = ts.SeparatedAttentionTrain if groups.role.kind == "attention" else ts.SeparatedExpertTrain
        return cls(model, plan, groups, env)
    if plan.strategy == "ep":
        return tr.EpTrain(model, plan, build_ep_groups(plan, model.cfg, env), env)
    if plan.strategy == "tp_pp":
        return tr.TpPpTrain(model, plan, build_tp_pp_groups(plan, env), env)
    raise ValueError(f"strategy {plan.strategy!r} cannot train")


def rank_rows(rank: tr.TrainRank, plan, batch_BL: torch.Tensor) -> torch.Tensor | None:
    """The rows of the global batch this rank computes on (None: an expert rank)."""
    if isinstance(rank, ts.SeparatedAttentionTrain):
        return tr.replica_rows(batch_BL, plan.attn_replicas, rank.role.replica)
    if isinstance(rank, tr.EpTrain):
        return tr.replica_rows(batch_BL, plan.ep, rank.rank)
    if isinstance(rank, ts.SeparatedExpertTrain):
        return None
    return batch_BL


class Trainer:
    """One rank's training state and loop."""

    def __init__(self, spec: TrainSpec, rank: tr.TrainRank, env, cfg, groups: tuple[int, int] | None = None):
        """groups: (replicas, micro-batches) of the step's token groups; None: the plan's (the
        single-device oracle takes another plan's, to compute the same loss)."""
        from .data import Batches
        self.spec, self.rank, self.env, self.cfg = spec, rank, env, cfg
        self.plan = spec.plan
        self.mp = MixedPrecision(rank.named_parameters(), spec.precision, spec.optim)
        self.syncer = GradSyncer(rank.syncs(), env.timeout, spec.grad_compression,
                                 node_size(spec.gpus_per_node, env.world_size), env.rank)
        rank.grads_ready = self.syncer.ready  # ranks whose schedule knows when a layer is done call it
        self.batches = Batches(spec.windows, spec.batch_size, spec.data_seed)
        seq_len = spec.windows.shape[1] - 1
        replicas, m = groups or (data_replicas(self.plan), getattr(self.plan, "microbatches", 1))
        self.shape = tr.StepShape(replicas, m, spec.batch_size * seq_len, spec.loss)
        self.step_index = 0
        self.history: list[dict] = []

    def memory(self) -> dict:
        return memory_breakdown(self.rank.named_parameters(), self.spec.precision)

    def train_step(self) -> dict:
        """One optimizer step; returns the step's row (the same on every rank)."""
        env = self.env
        start = time.perf_counter()
        if env.device.type == "cuda":  # GPU time from CUDA events (the step ends with host reads anyway)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            events[0].record()
        batch = self.batches.next_batch().to(env.device)
        self.mp.zero_grad()
        scale = self.mp.loss_scale()
        stats = self.rank.step(rank_rows(self.rank, self.plan, batch), self.shape, self.step_index, scale)
        overlapped = self.syncer.early_elements
        self.syncer.sync()
        # The norm counts each element of the model once (ParamSync.owner), not once per replica;
        # the gradients still carry the loss scale (a power of two, so dividing is exact).
        result = self.mp.step(None, lambda _local: world_sum(
            (self.syncer.local_norm_sq() / scale ** 2).to(env.device), env.timeout, "gradient norm").cpu())
        totals = world_sum(torch.tensor([stats.token_loss, stats.balance, stats.zloss], dtype=torch.float64,
                                        device=env.device), env.timeout, "step statistics").cpu().tolist()
        load = self._expert_load(stats)
        if env.device.type == "cuda":
            events[1].record()
            events[1].synchronize()
            seconds = events[0].elapsed_time(events[1]) / 1e3
        else:
            seconds = time.perf_counter() - start
        tokens = self.shape.global_tokens
        row = dict(step=self.step_index + 1, loss=totals[0] / tokens + totals[1] + totals[2],
                   token_loss=totals[0] / tokens, balance_loss=totals[1], z_loss=totals[2],
                   grad_norm=result.grad_norm, lr=result.lr, loss_scale=result.scale, skipped=not result.ok,
                   tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                   grad_bytes_sent=self.syncer.bytes_sent, grad_bytes_uncompressed=self.syncer.bytes_uncompressed,
                   grad_sync_overlapped=overlapped,
                   expert_load=load)
        self.step_index += 1
        self.history.append(row)
        return row

    def _expert_load(self, stats: tr.MicroStats) -> list[float] | None:
        """Share of routed pairs per expert this step (summed over layers and ranks)."""
        local = torch.zeros(self.cfg.num_experts, dtype=torch.float64, device=self.env.device)
        if stats.load_LE is not None:
            local += stats.load_LE.sum(0).to(local)
        total = world_sum(local, self.env.timeout, "expert load").cpu()
        s = float(total.sum())
        return [round(float(v) / s, 4) for v in total] if s > 0 else None


def train_on(env, spec: TrainSpec, model) -> dict | None:
    """Train this rank's part of `model` (full, on this rank's device). Rank 0 returns a report."""
    from . import ckpt, log
    plan = spec.plan.validate(model.cfg, env.world_size)
    cfg = model.cfg
    spec.validate(cfg)
    model.train()
    rank = build_train_rank(plan, model, env)
    trainer = Trainer(spec, rank, env, cfg)
    if spec.resume:
        ckpt.load(trainer, spec.save_dir)
    logger = log.TrainLog(spec, env.rank, trainer, start_step=trainer.step_index)
    finished = False
    try:
        while trainer.step_index < spec.steps:
            row = trainer.train_step()
            logger.step(row)
            if spec.save_dir and spec.save_every and trainer.step_index % spec.save_every == 0:
                ckpt.save(trainer, spec.save_dir)
        if spec.save_dir and not (spec.save_every and trainer.step_index % spec.save_every == 0):
            ckpt.save(trainer, spec.save_dir)
        finished = True
    finally:
        logger.close()
        # Only after a clean run: after an error, the peers may be anywhere in the step, and the
        # stop handshake would read one of their messages and hide the error that matters.
        if finished and hasattr(rank, "finish"):
            rank.finish()
    report = dict(history=trainer.history, memory=trainer.memory() if env.rank == 0 else None,
                  skipped_steps=trainer.mp.skipped_steps, plan=plan.describe(cfg),
                  grad_sync={" ".join(map(str, ranks)): why for ranks, why in sorted(trainer.syncer.reasons.items())})
    need_full = spec.return_state or spec.export_dir
    if need_full:
        from ..model import MoETransformer
        from .assemble import gather_full_state
        with torch.device("meta"):
            template = MoETransformer(cfg, dtype=torch.float32)
        state = gather_full_state(rank, template)
        if env.rank == 0:
            if spec.export_dir:
                report["export"] = export(state, cfg, spec)
            if spec.return_state:  # numpy: torch tensors would cross the process boundary as shared
                report["state"] = {k: v.numpy() for k, v in state.items()}  # memory the rank frees on exit
    return report if env.rank == 0 else None


def export(state: dict, cfg, spec: TrainSpec) -> str:
    """Write the trained weights as an HF checkpoint (+ the tokenizer) that masep run/serve and
    transformers load."""
    import shutil
    from ..checkpoint import save_pretrained
    from ..model import MoETransformer
    model = MoETransformer(cfg, dtype=torch.float32)
    model.load_state_dict(state)
    model.to(cfg.torch_dtype)
    out = save_pretrained(model, spec.export_dir)
    if spec.tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(spec.tokenizer_dir) / name
            if src.is_file():
                shutil.copy(src, Path(out) / name)
    return str(out)


def train_rank(spec: TrainSpec) -> dict | None:
    """Entry point of a spawned or torchrun-launched rank."""
    from ..parallel.worker import RunSpec, in_world
    run = RunSpec(plan=spec.plan, requests=[], preset=spec.preset, config=spec.config, model_dir=spec.model_dir,
                  seed=spec.seed, dtype=PRECISIONS[spec.precision], device=spec.device, backend=spec.backend,
                  timeout_s=spec.timeout_s)
    return in_world(run, lambda env, model: train_on(env, spec, model))


def check_training_memory(spec: TrainSpec, cfg, device_bytes: list[int]) -> None:
    """ValueError before any rank starts when a rank's optimizer states alone (16 bytes per
    parameter: weight, gradient, fp32 master and moments; perf/traincost.py) exceed its GPU's
    memory. Activations come on top; they depend on the kernels, so only the states are a
    certain refusal."""
    import logging
    from ..perf.hardware import get_profile
    from ..perf.traincost import TrainWorkload, rank_params, train_memory
    from ..plan import format_plan
    plan = spec.plan
    work = TrainWorkload(spec.batch_size, spec.windows.shape[1] - 1)
    for rank in range(plan.world_size):
        if rank >= len(device_bytes):
            break
        params = sum(rank_params(plan, cfg, rank).values())
        need = 16 * params
        estimate = train_memory(plan, cfg, rank, work, get_profile("h200").replace(reserved_bytes=0)).total
        if need <= device_bytes[rank] < estimate:
            logging.getLogger("masep.train").warning(
                "rank %d may run out of memory: about %.1f GB estimated (training state %.1f GB + activations of "
                "%d sequences of %d) on a %.1f GB GPU", rank, estimate / 1e9, need / 1e9, work.batch, work.seq_len,
                device_bytes[rank] / 1e9)
        if need > device_bytes[rank]:
            raise ValueError(
                f"plan {format_plan(plan)}: rank {rank} holds {params / 1e9:.2f} B parameters, whose "
                f"training state takes {need / 1e9:.1f} GB (16 bytes per parameter: bf16 weight and gradient, fp32 "
                f"master and two moments), more than its GPU's {device_bytes[rank] / 1e9:.1f} GB; spread the model "
                "over more ranks (masep plan --train finds a split that fits) or train fewer layers")


def _local_gpu_bytes(world_size: int) -> list[int]:
    """Memory of the GPU each local rank gets (rank i on device i)."""
    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    return [torch.cuda.get_device_properties(i % n).total_memory for i in range(world_size)]


def launch_training(spec: TrainSpec) -> dict:
    """Start plan.world_size local ranks (or, under torchrun, run this one)."""
    from ..parallel.launch import launched_by_torchrun, spawn
    if spec.device == "cuda" and not launched_by_torchrun():
        check_training_memory(spec, _spec_config(spec), _local_gpu_bytes(spec.plan.world_size))
    if launched_by_torchrun():
        return train_rank(spec)
    return spawn(spec.plan.world_size, train_rank, spec)


def _spec_config(spec: TrainSpec):
    if spec.config is not None:
        return spec.config
    if spec.model_dir is not None:
        from ..config import from_hf_config
        return from_hf_config(spec.model_dir)
    from ..config import preset
    return preset(spec.preset)


def summary(report: dict) -> str:
    h = report["history"]
    if not h:
        return "no steps"
    last = h[-1]
    mean_tps = sum(r["tokens_per_s"] for r in h) / len(h)
    text = (f"{len(h)} steps: cross-entropy {h[0]['token_loss']:.4f} -> {last['token_loss']:.4f} (loss with the "
            f"router terms {h[0]['loss']:.4f} -> {last['loss']:.4f}), {mean_tps:,.0f} tokens/s, "
            f"{report['skipped_steps']} skipped")
    if last["grad_bytes_uncompressed"]:
        text += f", gradient bytes sent {last['grad_bytes_sent'] / last['grad_bytes_uncompressed']:.2f}x of fp32"
    return text if math.isfinite(last["loss"]) else text + " (loss is not finite)"
