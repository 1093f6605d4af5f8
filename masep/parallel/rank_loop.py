"""What a model rank does under the front end: join, build its part, connect, execute steps.

A rank holds no request state. It builds its part of the model under the plan, connects to
the front end's control channel (control.py), says which unit it computes for and how many
KV slots fit its memory, and then runs one step per "step" message until "stop":
  - a unit member (the single model, a separated attention rank, an EP rank, a TP x PP rank)
    runs its runtime's `forward(rows, step_id)`; the unit's leader samples and sends tokens;
  - a separated expert rank reads the handshakes of the replicas that step (the message names
    them) and serves their experts.
At "stop" each rank sends its report (busy time by op, expert load) and leaves.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch

from ..engine.sampling import sample
from . import comm, control
from .ep import EpRuntime
from .groups import build_ep_groups, build_separated_groups, build_tp_pp_groups, init_distributed
from .schedule import separated_schedule
from .separated import SeparatedAttentionRuntime, _ExpertServer
from .stepper import OpTimer
from .tp_pp import TpPpRuntime
from .worker import RunSpec, _maybe_profile, apply_plan, load_model, use_fast_path


@dataclass
class KvBudget:
    """How many KV slots of `max_len` positions a rank may allocate."""

    max_len: int
    gpu_memory_utilization: float = 0.9  # CUDA: the share of the GPU's memory the process may use

    def slots_that_fit(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> int | None:
        """Slots within the memory budget (CUDA), or None (CPU: the front end's max_num_seqs decides)."""
        if device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        per_slot = 2 * layers * kv_heads * (self.max_len + 1) * head_dim * torch.finfo(dtype).bits // 8
        return max(0, int((self.gpu_memory_utilization * total - used) // per_slot))


@dataclass
class RankSpec:
    run: RunSpec  # plan, model source, dtype, device, backend, timeout
    address: control.Address | None  # the front end's control channel (None: published by rank 0)
    kv: KvBudget


class UnitMember:
    """A rank that runs a runtime for one unit."""

    def __init__(self, runtime, info: control.RankInfo, timer: OpTimer):
        self.runtime, self.info, self.timer = runtime, info, timer

    def start(self, num_slots: int, max_len: int) -> None:
        self.runtime.start(num_slots, max_len)

    def step(self, step_id: int, rows, units) -> list | None:
        logits = self.runtime.forward(rows, step_id)
        return sample(logits, rows.sample) if self.info.leader else None

    def stop(self) -> dict:
        self.runtime.stopped = True  # every rank got "stop": no peer needs telling
        self.runtime.finish()
        report = dict(role=self.info.role, busy_s=dict(self.timer.busy_s))
        if isinstance(self.runtime, EpRuntime):
            report["load"] = self.runtime.load_LE.tolist()
        return report


class ExpertMember:
    """A separated expert rank: serves the replicas named in each step message."""

    def __init__(self, model, plan, groups, env, timer: OpTimer, graphs: bool):
        self.plan, self.groups, self.timer = plan, groups, timer
        self.info = control.RankInfo(env.rank, "expert", None, False, None, os.getpid())
        self.cfg = model.cfg
        self.server = _ExpertServer(model, plan, groups, env, graphs)
        self.ops = separated_schedule("expert", self.cfg.num_layers, plan.microbatches)
        self.load_LE = torch.zeros(self.cfg.num_layers, self.cfg.num_experts, dtype=torch.long)

    def start(self, num_slots: int, max_len: int) -> None:
        pass

    def step(self, step_id: int, rows, units) -> None:
        bridges = [self.groups.bridges[u] for u in units]
        layouts = [comm.expert_begin_step(b, step_id, self.plan.microbatches, self.cfg.hidden_size,
                                          self.server.dtype) for b in bridges]
        working = list(zip(bridges, layouts))
        with torch.inference_mode():
            loads = self.server.step(self.ops, working, step_id, self.timer)
        for bridge, layout in working:
            comm.end_step(layout, bridge)
        self.load_LE[:, list(self.server.my_experts)] += loads.cpu()

    def stop(self) -> dict:
        return dict(role="expert", busy_s=dict(self.timer.busy_s), load=self.load_LE.tolist())


def build_member(spec: RankSpec, model, env) -> "UnitMember | ExpertMember":
    """This rank's part under the plan; its `info` is what it tells the front end."""
    plan = apply_plan(env, spec.run.plan, model)
    graphs = use_fast_path(spec.run, model, env.device)
    timer = OpTimer(label_ops=spec.run.trace_dir is not None)
    cfg, kv = model.cfg, spec.kv
    if plan.strategy == "separated":
        groups = build_separated_groups(plan, cfg, env)
        role = groups.role
        if role.kind == "expert":
            return ExpertMember(model, plan, groups, env, timer, graphs)
        runtime = SeparatedAttentionRuntime(model, plan, groups, env, timer, graphs)
        info = ("attention", role.replica, role.index == 0)
    elif plan.strategy == "ep":
        runtime = EpRuntime(model, plan, build_ep_groups(plan, cfg, env), env, timer, graphs)
        info = ("ep", env.rank, True)
    else:
        runtime = TpPpRuntime(model, plan, build_tp_pp_groups(plan, env), env, timer, graphs)
        info = ("tp_pp", 0, env.rank == 0)
    layers, kv_heads, dtype = runtime._cache_shape
    slots = kv.slots_that_fit(layers, kv_heads, cfg.head_dim, dtype, env.device)
    return UnitMember(runtime, control.RankInfo(env.rank, *info, slots, os.getpid()), timer)


def rank_main(spec: RankSpec) -> None:
    """A spawned rank (or a torchrun process): join the world, build, connect, serve steps."""
    env = init_distributed(spec.run.device, spec.run.timeout_s, spec.run.backend)
    try:
        serve_front_end(spec, env, spec.address)
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


def serve_front_end(spec: RankSpec, env, address: control.Address) -> None:
    model = load_model(spec.run, env.device, env.rank)
    member = build_member(spec, model, env)
    conn = control.connect(address, spec.run.timeout_s)
    who = f"rank {env.rank}"
    control.send(conn, ("hello", member.info), who)
    try:
        with _maybe_profile(spec.run.trace_dir, env.rank):  # --trace: a Chrome trace per rank
            _loop(conn, member, who)
    except control.ChannelClosed:
        return  # the front end is gone: nothing left to serve
    except BaseException:
        try:
            control.send(conn, ("error", f"{who}: {traceback.format_exc()}"), who)
        except control.ChannelClosed:
            pass
        raise
    finally:
        conn.close()


def _loop(conn, member, who: str) -> None:
    while True:
        msg = control.recv(conn, None, who)  # an idle server sends nothing for as long as it likes
        kind = msg[0]
        if kind == "start":
            member.start(msg[1], msg[2])
            control.send(conn, ("ready",), who)
        elif kind == "step":
            _, step_id, rows, units = msg
            tokens = member.step(step_id, rows, units)
            if tokens is not None:
                control.send(conn, ("tokens", step_id, tokens), who)
        elif kind == "stop":
            control.send(conn, ("report", member.stop()), who)
            return
        else:
            raise ValueError(f"{who}: unknown control message {kind!r}")
