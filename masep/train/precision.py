"""Mixed precision for training: fp32 master weights, AdamW, loss scaling, LR schedule, memory report.

Each rank builds one MixedPrecision over the parameters it owns and, per step:

    mp.zero_grad()
    (loss * mp.loss_scale()).backward()
    <all-reduce p.grad over the data-parallel replicas>
    result = mp.step(max_norm, norm_sq_fn)  # unscale, finite check, clip, AdamW, LR step, copy back

Modes:
  fp32  torch AdamW directly on the model's fp32 parameters; loss scale 1.
  bf16  the model's parameters stay bf16; fp32 master copies carry AdamW. A bf16 weight cannot
        take an update below half its ulp (2^-9 relative): lr * 1 updates round away, so bf16
        weights updated in place stall (tests/test_train_optim.py measures it). Loss scale 1.
  fp16  as bf16, plus dynamic loss scaling: fp16 gradients flush to zero below 2^-24, so the
        loss is multiplied by a scale (2^16 at first), halved on overflow, doubled after
        `growth_interval` clean steps (torch's GradScaler refuses fp16 gradients, so it is ours).

A step whose gradients hold an inf or nan (on any rank) is skipped in every mode: no AdamW
update, no LR-schedule advance (the schedule counts updates taken, as Megatron and vLLM do, so
early fp16 overflows don't eat the warm-up), counted in `skipped_steps`; fp16 halves its scale.

Bytes per parameter (memory_breakdown): weights (2, or 4 in fp32) + fp32 master (4, bf16/fp16
only: in fp32 the weights are the masters) + Adam's two fp32 moments (8) = 14 (bf16/fp16) or
12 (fp32); gradients in the parameter dtype add 2 or 4 (16 either way); inside step() bf16/fp16
hold fp32 copies of the gradients too (+4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .optim import OptimConfig, param_groups, warmup_cosine

MODES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_FORMAT = 1


@dataclass(frozen=True)
class StepResult:
    ok: bool  # False: a gradient was inf/nan on some rank; nothing was updated
    grad_norm: float  # global L2 norm of the unscaled gradients before clipping (inf/nan when not ok)
    scale: float  # the loss scale this step's gradients carried (mp.loss_scale() is the next one)
    lr: float  # the LR this update used (when skipped: the one it would have used)


@dataclass
class LossScaler:
    """Dynamic loss scale (fp16); `dynamic=False` pins the scale at 1 (bf16, fp32)."""

    scale: float = 2.0 ** 16
    growth_interval: int = 2000  # clean steps between doublings
    dynamic: bool = True
    min_scale: float = 1.0  # a scale below 1 would only push small fp16 gradients under 2^-24
    growth_tracker: int = 0  # clean steps since the scale last changed

    def update(self, ok: bool) -> None:
        if not self.dynamic:
            return
        if not ok:
            self.scale, self.growth_tracker = max(self.scale * 0.5, self.min_scale), 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale, self.growth_tracker = self.scale * 2.0, 0


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _fused_adamw_available(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW on CUDA parameters (feature-checked: the flag and a CUDA device)."""
    import inspect
    return bool(params) and all(p.device.type == "cuda" for p in params) \
        and "fused" in inspect.signature(torch.optim.AdamW).parameters


def _trainable(named_params, mode: str) -> list[tuple[str, torch.Tensor]]:
    """Unique (tied weights once), trainable params; ValueError on a dtype the mode can't train."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {sorted(MODES)}")
    out, seen = [], set()
    for name, p in named_params:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if p.dtype not in (MODES[mode], torch.float32):
            hint = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(p.dtype)
            raise ValueError(f"parameter {name!r} is {p.dtype} but mode={mode!r} trains {MODES[mode]} "
                             f"(or fp32) parameters" + (f"; use mode={hint!r}" if hint else ""))
        out.append((name, p))
    return out


class MixedPrecision:
    """AdamW + LambdaLR(warmup_cosine) + clipping + loss scaling over one rank's parameters.

    named_params: (name, parameter) pairs this rank owns; names key the state dict, so use the
    model's FQNs. Build it after the model's weights are loaded: the masters copy them here.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], mode: str, optim_cfg: OptimConfig,
                 *, growth_interval: int = 2000, init_scale: float = 2.0 ** 16, fused: bool | None = None):
        named = _trainable(named_params, mode)
        optim_cfg.validate()
        if mode == "fp16" and not (growth_interval >= 1 and init_scale >= 1):
            raise ValueError(f"growth_interval={growth_interval}, init_scale={init_scale}: both must be >= 1")
        self.mode, self.cfg = mode, optim_cfg
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # fp32: the parameters are their own masters. Otherwise one fp32 copy, made once.
        low = mode != "fp32"
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params] if low else self.params
        self.scaler = LossScaler(init_scale if mode == "fp16" else 1.0, growth_interval, dynamic=mode == "fp16")
        self.num_updates = 0  # optimizer updates taken (= the LR schedule's step)
        self.skipped_steps = 0  # steps skipped for a non-finite gradient
        # On CUDA the fused AdamW: one kernel reads each parameter's gradient, master and moments
        # once, and divides the gradient by `grad_scale` on the way (the loss scale and the clip
        # factor), so no separate pass unscales or clips. Elsewhere foreach=None lets torch choose.
        self.fused = _fused_adamw_available(self.masters) if fused is None else fused
        kind = dict(fused=True) if self.fused else dict(foreach=None)
        self.optimizer = torch.optim.AdamW(param_groups(zip(self.names, self.masters), optim_cfg.weight_decay),
                                           lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps, **kind)
        self._init_adam_state()
        c = optim_cfg
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, c.warmup_steps, c.total_steps, c.min_lr_ratio))

    def _init_adam_state(self) -> None:
        # What AdamW would create lazily at its first step (same dtypes and devices, so updates are
        # unchanged), made now so state_dict() has its final structure from the start:
        # torch.distributed.checkpoint loads in place into the structure of a fresh state dict.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                step = torch.tensor(0.0, dtype=torch.float32, device=p.device) if self.fused else \
                    torch.tensor(0.0, dtype=torch.get_default_dtype())
                self.optimizer.state[p] = {"step": step,
                                           "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                           "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    # --- the per-step calls -------------------------------------------------------------------
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (1.0 unless fp16)."""
        return self.scaler.scale

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, max_norm: float | None = None,
             norm_sq_fn: Callable[[torch.Tensor], torch.Tensor] = _identity) -> StepResult:
        """Unscale, check, clip and apply the gradients in the params' .grad (after the trainer's
        all-reduce); max_norm None = optim_cfg.max_grad_norm.

        norm_sq_fn(local [] fp32 tensor on the params' device: this rank's sum of squared unscaled
        gradients) -> the global sum (all-reduce SUM over the ranks that share this model); called
        exactly once per step on every rank, even one without gradients, since it is a collective.
        A non-finite global sum skips the step on every rank alike. One host read per step.
        Gradients are consumed: the params' .grad is unscaled/clipped in place in fp32 mode.
        """
        max_norm = self.cfg.max_grad_norm if max_norm is None else float(max_norm)
        scale, lr = self.scaler.scale, self.optimizer.param_groups[0]["lr"]
        grads = self._master_grads()
        if scale != 1.0 and not self.fused:
            torch._foreach_mul_(grads, 1.0 / scale)  # exact: scales are powers of 2 (from a power-of-2 init)
        local = self._local_norm(grads).square()
        norm_sq = norm_sq_fn(local / scale ** 2 if self.fused else local)  # exact: power-of-2 scale
        norm_sq_host = float(norm_sq)
        ok = math.isfinite(norm_sq_host)
        if ok:
            # As torch.nn.utils.clip_grad_norm_: multiply even when the factor is 1 (no branch on device data).
            coef = torch.clamp(max_norm / (norm_sq.sqrt() + 1e-6), max=1.0)
            if self.fused:  # the fused kernel divides each gradient by grad_scale as it reads it
                self.optimizer.grad_scale = (scale / coef).to(torch.float32).to(self.masters[0].device)
            elif grads:
                torch._foreach_mul_(grads, coef.to(grads[0].device))
            self.optimizer.step()
            self.optimizer.grad_scale = None
            self.scheduler.step()
            self.num_updates += 1
            self._copy_back()
        else:
            self.skipped_steps += 1
        self.scaler.update(ok)
        if self.mode != "fp32":
            for m in self.masters:  # fp32 gradient copies live only inside step()
                m.grad = None
        return StepResult(ok, math.sqrt(norm_sq_host) if norm_sq_host >= 0 else math.nan, scale, lr)

    def _master_grads(self) -> list[torch.Tensor]:
        if self.mode == "fp32":
            return [p.grad for p in self.params if p.grad is not None]
        have = [(p, m) for p, m in zip(self.params, self.masters) if p.grad is not None]
        grads = [torch.empty_like(m) for _, m in have]
        if grads:  # one multi-tensor kernel converts every gradient to fp32
            torch._foreach_copy_(grads, [p.grad for p, _ in have])
        for (_, m), g in zip(have, grads):
            m.grad = g
        return grads

    def _local_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        # Computed as clip_grad_norm_ does (a norm of per-tensor norms), so on one rank
        # sqrt(norm^2) gives back its value exactly and fp32 mode clips bit for bit like torch.
        if not grads:
            return torch.zeros((), device=self.params[0].device if self.params else "cpu")
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)

    def _copy_back(self) -> None:
        if self.mode != "fp32":
            torch._foreach_copy_(self.params, self.masters)  # round to nearest even

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model's own weights, as nested dicts of
        tensors and plain values (torch.distributed.checkpoint can save and reshard it):

          format                   STATE_FORMAT (1)
          mode                     "fp32" | "bf16" | "fp16"
          masters                  {param name: fp32 tensor}; {} in fp32 mode (the weights are the masters)
          optimizer.state          {param name: {"step": [] fp32 (CPU; the params' device when fused),
                                                 "exp_avg": fp32, "exp_avg_sq": fp32}}
          optimizer.param_groups   torch's AdamW groups (lr, initial_lr, betas, eps, weight_decay, ...,
                                   param_names) without the positional "params"
          scheduler                LambdaLR.state_dict() without "lr_lambdas" (a pure function of the step)
          scaler                   {"scale": float, "growth_tracker": int}
          counters                 {"num_updates": int, "skipped_steps": int}

        The tensors are the live ones, not copies (as torch.optim does): save or clone before stepping on.
        """
        osd = self.optimizer.state_dict()
        name_of = {i: n for g in osd["param_groups"] for i, n in zip(g["params"], g["param_names"])}
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {
            "format": STATE_FORMAT,
            "mode": self.mode,
            "masters": dict(zip(self.names, self.masters)) if self.mode != "fp32" else {},
            "optimizer": {"state": {name_of[i]: s for i, s in osd["state"].items()},
                          "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]},
            "scheduler": sched,
            "scaler": {"scale": self.scaler.scale, "growth_tracker": self.scaler.growth_tracker},
            "counters": {"num_updates": self.num_updates, "skipped_steps": self.skipped_steps},
        }

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore from state_dict()'s layout; the model's parameters are set from the masters
        (in fp32 mode load the model's weights yourself). The next step is then bit-identical
        to the one the saved run would have taken."""
        if sd.get("format") != STATE_FORMAT or sd.get("mode") != self.mode:
            raise ValueError(f"state dict format={sd.get('format')!r} mode={sd.get('mode')!r}: this MixedPrecision "
                             f"reads format={STATE_FORMAT} mode={self.mode!r}")
        self._check_names("optimizer.state", {n: s["exp_avg"] for n, s in sd["optimizer"]["state"].items()})
        if self.mode != "fp32":
            self._check_names("masters", sd["masters"])
            for name, m in zip(self.names, self.masters):
                m.copy_(sd["masters"][name])
            self._copy_back()
        groups = sd["optimizer"]["param_groups"]
        index = {n: i for i, n in enumerate(n for g in groups for n in g["param_names"])}
        self.optimizer.load_state_dict({
            "state": {index[n]: s for n, s in sd["optimizer"]["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["param_names"]]} for g in groups]})
        self.scheduler.load_state_dict({**sd["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self.scaler.scale = float(sd["scaler"]["scale"])
        self.scaler.growth_tracker = int(sd["scaler"]["growth_tracker"])
        self.num_updates = int(sd["counters"]["num_updates"])
        self.skipped_steps = int(sd["counters"]["skipped_steps"])

    def _check_names(self, field: str, saved: dict[str, torch.Tensor]) -> None:
        missing, extra = set(self.names) - set(saved), set(saved) - set(self.names)
        if missing or extra:
            raise ValueError(f"state dict {field}: parameters missing {sorted(missing)[:3]}, unexpected "
                             f"{sorted(extra)[:3]}; load a checkpoint of the same parameters (this rank's slice)")
        for name, m in zip(self.names, self.masters):
            if saved[name].shape != m.shape:
                raise ValueError(f"state dict {field}: {name!r} is {list(saved[name].shape)} in the state dict but "
                                 f"{list(m.shape)} here; load a checkpoint of the same model and plan")


# --- memory ---------------------------------------------------------------------------------
def memory_breakdown(named_params: Iterable[tuple[str, torch.Tensor]], mode: str) -> dict:
    """Training-state bytes of these parameters (one rank's slice, or a whole model built on the
    meta device) under `mode`; activations not included.

    Rule: weights and gradients in the parameter dtype; an fp32 master copy of every parameter
    in bf16/fp16 mode and none in fp32 mode (the weights are the masters); Adam's two moments
    in fp32. Keys (bytes): weights,
    master_weights, adam_moments, gradients, step_fp32_gradients (bf16/fp16: the fp32 gradient
    copies that exist only inside step()), total_without_grads (the paper's 14 bytes/param in
    bf16), total, peak_in_step; and num_params, mode, bytes_per_param {same keys: bytes / param}.
    """
    named = _trainable(named_params, mode)
    n = sum(p.numel() for _, p in named)
    weights = sum(p.numel() * p.element_size() for _, p in named)
    master = fp32_grads = 4 * n if mode != "fp32" else 0
    parts = {"weights": weights, "master_weights": master, "adam_moments": 8 * n, "gradients": weights,
             "step_fp32_gradients": fp32_grads}
    parts["total_without_grads"] = weights + master + 8 * n
    parts["total"] = parts["total_without_grads"] + weights
    parts["peak_in_step"] = parts["total"] + fp32_grads
    return {"mode": mode, "num_params": n, **parts,
            "bytes_per_param": {k: v / n if n else 0.0 for k, v in parts.items()}}


def format_breakdown(b: dict) -> str:
    """A short table of memory_breakdown(), in GB (1e9 bytes), or MB/KB for small slices."""
    unit, div = next((u, d) for u, d in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if b["total"] >= d or u == "KB")
    dtype = b["mode"]
    rows = [(f"weights ({dtype})", "weights"), ("fp32 master weights", "master_weights"),
            ("Adam moments (2 x fp32)", "adam_moments"), ("= without gradients", "total_without_grads"),
            (f"gradients ({dtype})", "gradients"), ("= total", "total"),
            ("+ fp32 grads inside step()", "step_fp32_gradients"), ("= peak in step()", "peak_in_step")]
    lines = [f"{dtype} training state, {b['num_params']:,} parameters", f"  {'':28}{'bytes/param':>12}{unit:>12}"]
    for label, key in rows:
        if key in ("master_weights", "step_fp32_gradients", "peak_in_step") and not b["master_weights"]:
            continue  # fp32: no masters, no gradient copies, peak = total
        lines.append(f"  {label:28}{b['bytes_per_param'][key]:>12.2f}{b[key] / div:>12.2f}")
    return "\n".join(lines)
