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
import queue
import threading
import time
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
from .stepper import OpTimer, dense_decode_rows
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
    """This rank's control connection. Sends from the step loop and the heartbeat thread are
    serialised; heartbeats go out only while a step runs (an idle server reads nothing, and
    beats would pile up in the socket).

    A reader thread takes every message off the connection, so the front end can reach a rank
    whose step thread is blocked: ("abort", epoch, dead_ranks, why) is acted on at once
    (`on_abort`: give up the groups with a dead member, which with NCCL is what unblocks the step
    thread); everything else waits in order for `recv`. The same thread bounds a step: one that
    runs past `step_limit_s` gives up every group of the rank (on_abort with every rank), so no
    NCCL wait outlives it even if the front end is wedged."""

    def __init__(self, conn, who: str, on_abort=None, step_limit_s: float | None = None):
        self.conn, self.who = conn, who
        self._on_abort, self._step_limit_s = on_abort, step_limit_s
        self._lock = threading.Lock()
        self._busy = threading.Event()
        self._busy_since = 0.0
        self._closed = threading.Event()
        self._inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._beat, name="masep-heartbeat", daemon=True).start()
        threading.Thread(target=self._read, name="masep-control-reader", daemon=True).start()

    def send(self, msg: tuple) -> None:
        with self._lock:
            control.send(self.conn, msg, self.who)

    def recv(self) -> tuple:
        """The next instruction; an idle server sends nothing for as long as it likes."""
        msg = self._inbox.get()
        if isinstance(msg, control.ChannelClosed):
            raise msg
        return msg

    def busy(self, on: bool) -> None:
        if on:
            self._busy_since = time.monotonic()
        (self._busy.set if on else self._busy.clear)()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                ready = self.conn.poll(0.5)
                msg = self.conn.recv() if ready else None
            except (EOFError, OSError) as err:
                self._inbox.put(control.ChannelClosed(f"{self.who}: connection closed ({type(err).__name__})"))
                return
            if msg is not None and msg[0] == "abort":
                if self._on_abort is not None:
                    self._on_abort(*msg[1:])
            elif msg is not None:
                self._inbox.put(msg)
            self._check_step_limit()

    def _check_step_limit(self) -> None:
        limit = self._step_limit_s
        if limit is None or not self._busy.is_set() or time.monotonic() - self._busy_since <= limit:
            return
        self._busy_since = float("inf")  # once per step
        if self._on_abort is not None:
            self._on_abort(None, None, f"{self.who}'s step ran past {limit:g} s; it gave up every group")

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


class WorldEpoch:
    """Which world this rank is in (0 at start-up, n after the n-th re-formation): an abort
    message names the world it is about, and one that arrives after its world was left is
    ignored (group names start again from 0 in a new world, so it would hit new groups)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_abort(self, epoch: int | None, dead: list[int] | None, why: str) -> None:
        """("abort", epoch, dead, why) from the front end; dead None: every group (a step past
        its limit)."""
        if epoch is not None and epoch != self.epoch:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            return
        comm.give_up_groups_with(set(range(dist.get_world_size())) if dead is None else set(dead), why)


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

    def _step_groups(self) -> list | None:
        """The groups a step of mine runs on (None: every group of the rank)."""
        rt = self.runtime
        if isinstance(rt, SeparatedAttentionRuntime):
            return [rt.bridge.group, rt.bridge.back_group, rt.replica_group]
        return None

    def _given_up_in_step(self, count_before: int) -> str | None:
        """Why a group of my step was given up while it ran: with NCCL the aborted transfers
        ended early and whatever the step computed from them is not data."""
        groups = self._step_groups()
        if groups is None:
            return "a group was given up" if comm.given_up_count() != count_before else None
        return comm.given_up_why(groups)

    def _forward(self, step_id: int, rows) -> "list | StepFailed | None":
        failed, tokens, before = None, None, comm.given_up_count()
        try:
            logits = self.runtime.forward(rows, step_id)
            tokens = sample(logits, rows.sample) if self.info.leader else None  # reads the logits
            why = self._given_up_in_step(before)
            if why is not None:
                raise comm.CommError(f"step {step_id} ended by the front end: {why}")
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
        return tokens

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

    def __init__(self, model, plan, groups, env, timer: OpTimer, graphs: bool, mirror: bool = False,
                 step_graphs: bool = False):
        self.plan, self.groups, self.timer = plan, groups, timer
        self.cfg = model.cfg
        self.server = _ExpertServer(model, plan, groups, env, graphs, step_graphs)
        self.info = control.RankInfo(env.rank, "expert", None, False, None, os.getpid(),
                                     tuple(self.server.my_experts))
        # rows served per (layer, local expert), on the device: read when the rank stops
        self.served = torch.zeros(self.cfg.num_layers, len(self.server.my_experts), dtype=torch.long,
                                  device=env.device)
        self.lost: set[int] = set()  # replicas whose bridge failed: never served again
        self.graphs, self.mirror = graphs, mirror
        self.unit_slots = 0  # each replica's KV slots (as its attention ranks allocate them)

    def start(self, num_slots: int, max_len: int) -> None:
        # a mirroring replica keeps its buddy's rows in a second half of its cache (UnitMember.start)
        self.unit_slots = 2 * num_slots if self.mirror else num_slots

    def step(self, step_id: int, rows, units) -> list[tuple[int, str]]:
        """Serve the replicas named for this step; returns [(unit, why)] of replicas whose
        bridge failed (dropped for good; the others were served). rows: {unit: the peer_rows
        its attention ranks were given} (None: that replica announces its step itself)."""
        units = [u for u in units if u not in self.lost]
        failed: dict[int, str] = {}
        bridges = [self.groups.bridges[u] for u in units]
        told = [(rows or {}).get(u) for u in units]
        agreed = [None if t is None else dense_decode_rows(t, self.unit_slots, self.graphs) for t in told]
        _, loads = self.server.serve(bridges, step_id, self.timer, failed, agreed)
        self.served += loads
        for i, bridge in enumerate(bridges):  # NCCL: an aborted transfer can end without an error
            why = comm.given_up_why([bridge.group, bridge.back_group]) if i not in failed else None
            if why is not None:
                failed[i] = why
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
        self.server.bridges_changed()
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
        self.server.bridges_changed()
        self.lost.clear()

    def stop(self) -> dict:
        return dict(role="expert", busy_s=dict(self.timer.busy_s), load=self.server.global_loads(self.served).tolist())


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
    comm.open_groups(env.device)  # as the replacement does before its hello


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
            return ExpertMember(model, plan, groups, env, timer, graphs, spec.mirror and plan.attn_replicas >= 2,
                                spec.run.separated_step_graphs)
        runtime = SeparatedAttentionRuntime(model, plan, groups, env, timer, graphs, spec.run.separated_step_graphs)
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


def let_the_front_end_abort() -> None:
    """NCCL's watchdog would, by default, end this process when a collective errors, and an
    abort (ours, on the front end's word that a peer died) makes the collectives in flight
    error: the survivor would die with the dead. Turned off here unless the user set it; the
    bound it gave is kept by RankChannel's step limit and the front end's timeouts."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


def rank_main(spec: RankSpec) -> None:
    """A spawned rank (or a torchrun process): join the world, build, connect, serve steps."""
    let_the_front_end_abort()
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
    world = WorldEpoch(spec.join.epoch if spec.join else 0)
    comm.open_groups(env.device)  # before "hello": the front end serves only once every rank has
    channel = RankChannel(control.connect(address, spec.run.timeout_s), who, world.on_abort,
                          rank_wait_s(spec.run.timeout_s))
    channel.send(("hello", member.info))

    def reform(join: JoinPoint) -> None:
        reform_world(member, spec, env, join)
        world.epoch = join.epoch

    try:
        with _maybe_profile(spec.run.trace_dir, env.rank):  # --trace: a Chrome trace per rank
            _loop(channel, member, FaultInjector(spec.faults, env.rank), reform)
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
