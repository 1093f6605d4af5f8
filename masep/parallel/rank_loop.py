"""What a model rank does under the front end: join, build its part, connect, execute steps.

A rank holds no request state. It builds its part of the model under the plan, connects to
the front end's control channel (control.py), says which unit it computes for and how many
KV slots fit its memory, and then runs one step per "step" message until "stop":
  - a unit member (the single model, a separated attention rank, an EP rank, a TP x PP rank)
    runs its runtime's `forward(rows, step_id)`; the unit's leader samples and sends tokens;
  - a separated expert rank reads the handshakes of the replicas that step (the message names
    them) and serves their experts.
At "stop" each rank sends its report (busy time by op, expert load) and leaves.

Failures. While a step runs, a rank sends a heartbeat every HEARTBEAT_S, so the front end
can tell a stuck rank (silent) from one waiting on a stuck peer (beating). An expert rank
whose transfer on one replica's bridge fails drops that bridge, finishes the step for the
other replicas and tells the front end ("lost", step_id, unit, why). The ranks' own transfer
waits give up after `rank_wait_s(timeout)`, later than the front end's `timeout`, so the
front end decides who is dead before any survivor gives up on it. When an expert rank whose
experts nobody else holds dies, the attention ranks give up their whole world at once (so no
peer waits on them) and, told "rejoin", every survivor forms a new world with the replacement
the front end started (reform_world), keeping its weights and KV cache.
"""
from __future__ import annotations

import gc
import os
import threading
import traceback
from dataclasses import dataclass

import torch

from ..engine.sampling import sample
from ..errors import error_line
from ..model import CacheLayout
from . import comm, control
from . import mirror
from .faults import FaultInjector
from .ep import EpRuntime
from .groups import (JoinPoint, build_ep_groups, build_separated_groups, build_tp_pp_groups, init_distributed,
                     leave_world, rejoin_world)
from .separated import SeparatedAttentionRuntime, _ExpertServer
from .stepper import OpTimer
from .tp_pp import TpPpRuntime
from .worker import RunSpec, _maybe_profile, apply_plan, load_model, use_fast_path


@dataclass
class KvBudget:
    """How many KV slots of `max_len` positions a rank may allocate."""

    max_len: int
    gpu_memory_utilization: float = 0.9  # CUDA: the share of the GPU's memory the process may use

    def slots_that_fit(self, layers: int, layout: CacheLayout, dtype: torch.dtype, device) -> int | None:
        """Slots within the memory budget (CUDA), or None (CPU: the front end's max_num_seqs decides).
        layout: one layer's cache per position (an MLA layer's is its compressed latent)."""
        if device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        per_slot = layers * (self.max_len + 1) * layout.bytes_per_position(dtype)
        return max(0, int((self.gpu_memory_utilization * total - used) // per_slot))


HEARTBEAT_S = 0.25


def rank_wait_s(timeout_s: float) -> float:
    """How long a rank's transfers wait for a peer: twice the front end's timeout (plus a
    margin), so a stuck rank is found and stopped by the front end first."""
    return 2 * timeout_s + 5


@dataclass
class RankSpec:
    run: RunSpec  # plan, model source, dtype, device, backend, timeout
    address: control.Address | None  # the front end's control channel (None: published by rank 0)
    kv: KvBudget
    faults: tuple = ()  # faults.FaultSpec to inject (tests, demos)
    mirror: bool = False  # separated: keep each replica's KV rows on a buddy replica (mirror.py)
    join: JoinPoint | None = None  # a replacement rank: meet the survivors there (not MASTER_ADDR/PORT)


class RankChannel:
    """This rank's control connection: sends from the step loop and the heartbeat thread are
    serialised; heartbeats go out only while a step runs (an idle server reads nothing, and
    beats would pile up in the socket)."""

    def __init__(self, conn, who: str):
        self.conn, self.who = conn, who
        self._lock = threading.Lock()
        self._busy = threading.Event()
        self._closed = threading.Event()
        threading.Thread(target=self._beat, name="masep-heartbeat", daemon=True).start()

    def send(self, msg: tuple) -> None:
        with self._lock:
            control.send(self.conn, msg, self.who)

    def recv(self) -> tuple:
        return control.recv(self.conn, None, self.who)  # an idle server sends nothing for as long as it likes

    def busy(self, on: bool) -> None:
        (self._busy.set if on else self._busy.clear)()

    def _beat(self) -> None:
        while not self._closed.is_set():
            if self._busy.wait(0.5) and not self._closed.wait(HEARTBEAT_S):
                try:
                    if self._busy.is_set():
                        self.send(("beat",))
                except control.ChannelClosed:
                    return

    def close(self) -> None:
        self._closed.set()
        self.conn.close()


@dataclass
class StepFailed:
    """A step this rank could not finish because a peer died (it stays up for the front end's
    next instruction)."""

    why: str


class UnitMember:
    """A rank that runs a runtime for one unit."""

    def __init__(self, runtime, info: control.RankInfo, timer: OpTimer, links=None):
        """links: mirror.MirrorLinks when this replica mirrors its KV rows to a buddy."""
        self.runtime, self.info, self.timer, self.links = runtime, info, timer, links
        self.plan, self.cfg = runtime.plan, runtime.cfg
        self.shadow = None  # the previous replica's KV rows (mirror)

    def start(self, num_slots: int, max_len: int) -> None:
        if self.links is None:
            self.runtime.start(num_slots, max_len)
            return
        # mirror: slots [num_slots, 2 num_slots) of my cache keep the previous replica's rows; if
        # it dies its requests go on right there (the front end then gives me all 2 num_slots)
        self.runtime.start(2 * num_slots, max_len)
        self.shadow = self.runtime.cache.view(slice(num_slots, 2 * num_slots))

    def step(self, step_id: int, rows, units, theirs=None) -> "list | StepFailed | None":
        """Run my unit's rows (when it is in `units`), then exchange KV rows with the buddies
        (mirror; `theirs`: what the previous replica wrote in this step)."""
        mine = self.info.unit in units  # else a step only to receive the previous replica's rows
        out = self._forward(step_id, rows) if mine else None
        if self.links is not None and not isinstance(out, StepFailed):
            try:
                mirror.exchange(self.links, self.runtime.cache, self.shadow,
                                mirror.MirrorRows.of(rows) if mine and len(rows) else None, theirs)
            except RuntimeError:  # a neighbour died: the front end handles it; no more mirroring here
                self.links = None
        return out

    def _forward(self, step_id: int, rows) -> "list | StepFailed | None":
        failed = None
        try:
            logits = self.runtime.forward(rows, step_id)
        except RuntimeError as err:  # a transfer failed: an expert rank is routed around or replaced
            if not isinstance(self.runtime, SeparatedAttentionRuntime):
                raise
            failed = StepFailed(error_line(err))
        if failed is not None:  # outside the except block: the step's transfers are freed by now
            self.runtime.in_step = False
            if self.runtime.fallback:
                comm.abandon_bridge(self.runtime.bridge)  # peers still waiting on this rank get an error now
            else:  # nothing to route around with: the world is re-formed (or every rank stopped)
                self.leave_world()
            gc.collect()
            return failed
        return sample(logits, rows.sample) if self.info.leader else None

    def drop_expert_rank(self, x: int) -> None:
        self.runtime.drop_expert_rank(x)

    def leave_world(self) -> None:
        """Give up every group, so that a peer waiting on this rank anywhere (the replica's own
        group included) gets an error now instead of waiting out its timeout; the KV cache stays."""
        leave_world()
        self.runtime.bridge.group = self.runtime.bridge.back_group = self.runtime.replica_group = None
        self.links = None
        gc.collect()

    def use_groups(self, groups, links) -> None:
        self.runtime.use_groups(groups)
        self.links = links

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
        self.cfg = model.cfg
        self.server = _ExpertServer(model, plan, groups, env, graphs)
        self.info = control.RankInfo(env.rank, "expert", None, False, None, os.getpid(),
                                     tuple(self.server.my_experts))
        self.load_LE = torch.zeros(self.cfg.num_layers, self.cfg.num_experts, dtype=torch.long)
        self.lost: set[int] = set()  # replicas whose bridge failed: never served again

    def start(self, num_slots: int, max_len: int) -> None:
        pass

    def step(self, step_id: int, rows, units) -> list[tuple[int, str]]:
        """Serve the replicas named for this step; returns [(unit, why)] of replicas whose
        bridge failed (dropped for good; the others were served)."""
        units = [u for u in units if u not in self.lost]
        failed: dict[int, str] = {}
        _, loads = self.server.serve([self.groups.bridges[u] for u in units], step_id, self.timer, failed)
        self.load_LE[:, list(self.server.my_experts)] += loads.cpu()
        news = [(units[i], why) for i, why in sorted(failed.items())]
        self.lost |= {u for u, _ in news}
        return news

    def abandon_lost_bridges(self) -> None:
        """After the step's transfers are gone: give up the bridges that failed in it."""
        for unit in self.lost:
            if self.groups.bridges[unit] is not None:
                comm.abandon_bridge(self.groups.bridges[unit])
                self.groups.bridges[unit] = None
        gc.collect()  # the last references to the groups: gloo closes their connections

    def drop_expert_rank(self, x: int) -> None:
        """Expert-group index x is dead: serve every replica over its bridge without x."""
        for u in range(len(self.groups.bridges)):
            if self.groups.bridges[u] is not None:  # bridges that did not fail: given up here
                comm.abandon_bridge(self.groups.bridges[u])
            self.groups.bridges[u] = self.groups.fallback[u, x]
        self.server.graphs.clear()
        self.lost.clear()  # the failed step marked every bridge; the front end names live units

    def leave_world(self) -> None:
        leave_world()
        for bridge in list(self.groups.bridges) + list(self.groups.fallback.values()):
            if bridge is not None:
                bridge.group = bridge.back_group = None
        self.groups.expert_group = None
        gc.collect()

    def use_groups(self, groups, links) -> None:
        """Serve every replica over the groups of a re-formed world (the plan's own bridges)."""
        self.groups = groups
        self.server.graphs.clear()
        self.lost.clear()

    def stop(self) -> dict:
        return dict(role="expert", busy_s=dict(self.timer.busy_s), load=self.load_LE.tolist())


def reform_world(member, spec: RankSpec, env, join: JoinPoint) -> None:
    """A separated plan's survivor after an expert rank died: leave the old world, form a new one
    of the same ranks with the replacement at `join`, and build every group again the way
    build_member did at start-up (the replacement builds them there, in the same order); the
    weights and the KV cache stay as they are."""
    member.leave_world()
    rejoin_world(env, join)
    groups = build_separated_groups(member.plan, member.cfg, env)
    links = mirror.build_mirror_links(member.plan, env) if spec.mirror else None
    member.use_groups(groups, links)


def build_member(spec: RankSpec, model, env) -> "UnitMember | ExpertMember":
    """This rank's part under the plan; its `info` is what it tells the front end."""
    plan = apply_plan(env, spec.run.plan, model)
    graphs = use_fast_path(spec.run, model, env.device)
    timer = OpTimer(label_ops=spec.run.trace_dir is not None)
    cfg, kv = model.cfg, spec.kv
    links = None
    if plan.strategy == "separated":
        groups = build_separated_groups(plan, cfg, env)
        links = mirror.build_mirror_links(plan, env) if spec.mirror else None  # every rank: the groups
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
    layers, _, dtype = runtime._cache_shape
    slots = kv.slots_that_fit(layers, runtime._cache_layout, dtype, env.device)
    if links is not None and slots is not None:
        slots //= 2  # the shadow cache takes as much memory as the cache
    return UnitMember(runtime, control.RankInfo(env.rank, *info, slots, os.getpid()), timer, links)


def rank_main(spec: RankSpec) -> None:
    """A spawned rank (or a torchrun process): join the world, build, connect, serve steps."""
    env = init_distributed(spec.run.device, rank_wait_s(spec.run.timeout_s), spec.run.backend, spec.join)
    try:
        serve_front_end(spec, env, spec.address)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():  # an attention rank gives its world up itself when an expert rank dies
            dist.destroy_process_group()


def serve_front_end(spec: RankSpec, env, address: control.Address) -> None:
    model = load_model(spec.run, env.device, env.rank)
    member = build_member(spec, model, env)
    who = f"rank {env.rank}"
    channel = RankChannel(control.connect(address, spec.run.timeout_s), who)
    channel.send(("hello", member.info))
    try:
        with _maybe_profile(spec.run.trace_dir, env.rank):  # --trace: a Chrome trace per rank
            _loop(channel, member, FaultInjector(spec.faults, env.rank),
                  lambda join: reform_world(member, spec, env, join))
    except control.ChannelClosed:
        return  # the front end is gone: nothing left to serve
    except BaseException:
        try:
            channel.send(("error", f"{who}: {traceback.format_exc()}"))
        except control.ChannelClosed:
            pass
        raise
    finally:
        channel.close()


def _loop(channel: RankChannel, member, faults: FaultInjector, reform) -> None:
    while True:
        msg = channel.recv()
        kind = msg[0]
        if kind == "start":
            member.start(msg[1], msg[2])
            channel.send(("ready",))
        elif kind == "step":
            _, step_id, rows, units, *theirs = msg  # theirs: [MirrorRows | None] (mirror), else absent
            faults.before_step(step_id)
            channel.busy(True)
            try:
                result = member.step(step_id, rows, units, *theirs)
            finally:
                channel.busy(False)
            if isinstance(member, ExpertMember):
                member.abandon_lost_bridges()
                for unit, why in result:
                    channel.send(("lost", step_id, unit, f"{channel.who} lost the bridge of unit {unit}: {why}"))
            if isinstance(result, StepFailed):
                channel.send(("failed", step_id, f"{channel.who}: {result.why}"))
            elif isinstance(result, list) and not isinstance(member, ExpertMember):
                channel.send(("tokens", step_id, result))
            else:  # the front end watches for silent ranks only until each says it is done
                channel.send(("done", step_id))
        elif kind == "drop_expert":
            member.drop_expert_rank(msg[1])
            channel.send(("ready",))
        elif kind == "rejoin":  # ("rejoin", JoinPoint): a replacement expert rank joins the survivors
            reform(msg[1])
            channel.send(("ready",))
        elif kind == "stop":
            channel.send(("report", member.stop()))
            return
        else:
            raise ValueError(f"{channel.who}: unknown control message {kind!r}")
