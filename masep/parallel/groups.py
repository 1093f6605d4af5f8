"""Process groups built from a plan, following failure domains.

Hot-path traffic never uses the world group: each attention replica has its own group (the
head-parallel all-reduce) and its own bridge to the expert ranks, so a dead replica only
breaks its own groups. The world group is used once at the end to gather results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..plan import Role, SeparatedPlan
from . import comm
from .comm import Bridge


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout: timedelta


@dataclass(frozen=True)
class JoinPoint:
    """Where a re-formed world meets: the front end's TCPStore and a prefix of its own (one per
    re-formation), so no rank ever reads the keys, and dials the addresses, of a world before."""

    host: str
    port: int
    prefix: str
    epoch: int = 1  # the world's number: 0 is the one started with, n the n-th re-formed

    def store(self, timeout: timedelta):
        return dist.PrefixStore(self.prefix, dist.TCPStore(self.host, self.port, None, False, timeout))


def init_distributed(device_kind: str, timeout_s: float, backend: str = "auto", join: JoinPoint | None = None
                     ) -> DistEnv:
    """Join the world described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    backend "auto": gloo on CPU, NCCL on CUDA (one GPU per local rank). backend "gloo" with
    CUDA lets several ranks share one GPU (NCCL refuses that): the CUDA kernels then run under
    the real multi-rank runtime, with gloo moving the CUDA tensors (collectives only).
    join: meet at this store instead of MASTER_ADDR:MASTER_PORT (a replacement rank joining the
    survivors of a world that lost it, rejoin_world)."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: must be 'auto', 'gloo' or 'nccl'")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"environment variables {missing} are not set: launch with torchrun or masep's spawn helper")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout = timedelta(seconds=timeout_s)
    if device_kind == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if backend == "auto" else backend
        if backend == "nccl" and local_rank >= gpus:
            raise ValueError(f"--device cuda: local rank {local_rank} needs its own GPU for NCCL but {gpus} are "
                             "visible (NCCL refuses two ranks on one GPU); use fewer ranks or --backend gloo")
        if gpus == 0:
            raise ValueError("--device cuda: no GPU is visible")
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
    else:
        if backend == "nccl":
            raise ValueError("--backend nccl needs --device cuda")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    store=join.store(timeout) if join else _attempt_store(world, timeout))
        except dist.DistError as err:
            # torch's own message ("1/3 clients joined") does not say which environment made this
            # process wait: with variables left over from another launch nobody else ever comes.
            raise RuntimeError(
                f"rank {rank} could not join the world of WORLD_SIZE={world} at "
                f"MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']} within "
                f"{timeout_s:g} s ({err}). The other ranks failed to start, or these variables (RANK={rank}) "
                "are left over from another launch: unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT "
                "to let masep start its own ranks, or launch every rank with torchrun") from err
    return DistEnv(rank, world, local_rank, device, backend, timeout)


def leave_world() -> None:
    """Give up every process group of this process (NCCL: aborted first, where this torch can,
    since a communicator with a dead peer never finishes on its own). gloo closes a group's
    connections once nothing references it, so a peer still waiting on this rank inside any
    group gets an error at once: callers drop their references to the groups and collect."""
    if not dist.is_initialized():
        return
    comm.forget_given_up()
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if dist.get_backend() == "nccl" and abort is not None:
            abort()  # every group, the world's included
        else:
            dist.destroy_process_group()
    except (RuntimeError, ValueError):  # already aborted by NCCL's watchdog
        pass


def rejoin_world(env: DistEnv, join: JoinPoint) -> None:
    """Leave this process's world and form a fresh one of the same size and rank numbers with
    the ranks that meet at `join` (the survivors and the replacements of the dead). Blocks until
    every rank has come (env.timeout). The caller builds its groups again, as at start-up: group
    names restart from 0 after the world is destroyed, on every rank alike."""
    leave_world()
    dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size, timeout=env.timeout,
                            store=join.store(env.timeout))


def _attempt_store(world: int, timeout: timedelta):
    """Under torchrun with its agent's shared store: the store seen through a prefix of this
    attempt. The agent keeps one store across restarts (--max-restarts), so the keys of the
    attempt before (gloo's peer addresses) would be read again and the new ranks would dial
    dead processes. None otherwise (torch's own env:// rendezvous)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"masep/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


@dataclass
class SeparatedGroups:
    role: Role
    replica_group: object | None  # my replica's head-parallel group (attention ranks only)
    bridges: list[Bridge]  # attention rank: [its replica's bridge]; expert rank: one per replica
    expert_group: object | None
    # (replica, expert-group index x) -> the bridge of that replica without expert rank x, built
    # when the plan survives an expert rank's loss (plan.survives_expert_loss); my bridges only
    fallback: dict = field(default_factory=dict)


def build_separated_groups(plan: SeparatedPlan, cfg: ModelConfig, env: DistEnv) -> SeparatedGroups:
    """Create every group in the same order on every rank (torch requires it)."""
    role = plan.role(env.rank)
    max_local = max(len(p) for p in plan.expert_placement(cfg))
    experts = plan.expert_rank_ids()
    replica_group, bridges = None, []
    for r in range(plan.attn_replicas):
        attn = plan.replica_ranks(r)
        group = dist.new_group(attn, timeout=env.timeout)
        if role.kind == "attention" and role.replica == r:
            replica_group = group
    for r in range(plan.attn_replicas):
        members = plan.replica_ranks(r) + experts
        group = dist.new_group(members, timeout=env.timeout)
        back = dist.new_group(members, timeout=env.timeout)  # expert outputs return on their own group
        if env.rank in members:
            bridges.append(Bridge(group, members, members.index(env.rank), plan.attn_tp, r, max_local,
                                  env.timeout, env.device, cfg.top_k, back))
    expert_group = dist.new_group(experts, timeout=env.timeout)
    fallback = {}
    if plan.survives_expert_loss(cfg):  # every rank creates every group, in the same order
        for r in range(plan.attn_replicas):
            for x, gone in enumerate(experts):
                members = plan.replica_ranks(r) + [e for e in experts if e != gone]
                group = dist.new_group(members, timeout=env.timeout)
                back = dist.new_group(members, timeout=env.timeout)
                if env.rank in members:
                    fallback[r, x] = Bridge(group, members, members.index(env.rank), plan.attn_tp, r, max_local,
                                            env.timeout, env.device, cfg.top_k, back)
    return SeparatedGroups(role, replica_group, bridges, expert_group if role.kind == "expert" else None, fallback)


@dataclass
class EpGroups:
    role: Role
    bridge: Bridge  # all EP ranks: each is both a sender and an expert holder


def build_ep_groups(plan, cfg: ModelConfig, env: DistEnv) -> EpGroups:
    """One group of the EP ranks (its own group, not the world one, so a later multi-instance
    launch keeps instances apart)."""
    ranks = list(range(plan.world_size))
    group = dist.new_group(ranks, timeout=env.timeout)
    back = dist.new_group(ranks, timeout=env.timeout)  # the combine's all-to-all
    max_local = max(len(p) for p in plan.expert_placement(cfg))
    bridge = Bridge(group, ranks, env.rank, plan.world_size, env.rank, max_local, env.timeout, env.device,
                    cfg.top_k, back)
    return EpGroups(plan.role(env.rank), bridge)


@dataclass
class TpPpGroups:
    role: Role
    tp_group: object  # the ranks of my stage
    prev_group: object | None  # [rank of stage s-1 with my tp index, me]
    next_group: object | None  # [me, rank of stage s+1 with my tp index]
    model_group: object  # every rank of this model instance: the last stage shares logits on it


def build_tp_pp_groups(plan, env: DistEnv) -> TpPpGroups:
    role = plan.role(env.rank)
    tp_group = prev_group = next_group = None
    for stage in range(plan.pp):
        group = dist.new_group(plan.stage_ranks(stage), timeout=env.timeout)
        if stage == role.replica:
            tp_group = group
    for stage in range(plan.pp - 1):
        for t in range(plan.tp):
            pair = [stage * plan.tp + t, (stage + 1) * plan.tp + t]
            group = dist.new_group(pair, timeout=env.timeout)
            if env.rank == pair[0]:
                next_group = group
            if env.rank == pair[1]:
                prev_group = group
    model_group = dist.new_group(list(range(plan.world_size)), timeout=env.timeout)
    return TpPpGroups(role, tp_group, prev_group, next_group, model_group)
