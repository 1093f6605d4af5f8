"""The control channel between the front end and the model ranks.

The front end (scheduler + HTTP server) is not a model rank. It listens on a TCP port;
every rank connects once, says who it is, and from then on executes what it is told. The
channel carries small pickled messages (step rows, sampled tokens, reports), never tensors:
activations move between ranks over torch.distributed, as before.

Front end -> rank:  ("start", num_slots, max_len) | ("step", step_id, rows, units): rows is the unit's StepRows
                    (a separated expert rank: {unit: StepRows.peer_rows of its decode step, else None})
                    | ("drop_expert", expert_group_index) | ("rejoin", groups.JoinPoint) | ("stop",)
Rank -> front end:  ("hello", RankInfo) | ("ready",) | ("tokens", step_id, [int | None])
                    | ("done", step_id) | ("beat",) | ("lost", step_id, unit, why)
                    | ("failed", step_id, why)
                    | ("report", dict) | ("error", text)

Every wait has a timeout; a closed connection means the other side is gone, and a rank whose
front end is gone exits (no rank outlives the server).
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener


class ChannelClosed(ConnectionError):
    """The other end of a control connection is gone."""


class ChannelTimeout(TimeoutError):
    pass


@dataclass
class RankInfo:
    """What a rank tells the front end when it connects."""

    rank: int
    role: str  # "attention" | "expert" | "ep" | "tp_pp"
    unit: int | None  # the data-parallel unit it computes for (None: expert ranks)
    leader: bool  # sends the unit's sampled tokens back
    max_slots: int | None  # KV slots of max_len that fit its memory budget (None: no KV here)
    pid: int
    experts: tuple[int, ...] = ()  # expert ids it holds (expert ranks)


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    authkey: bytes


def listen(host: str = "127.0.0.1") -> tuple[Listener, Address]:
    """A listener on a free port; the auth key keeps strangers on the port out."""
    key = secrets.token_bytes(16)
    listener = Listener((host, 0), authkey=key)
    return listener, Address(host, listener.address[1], key)


def connect(addr: Address, timeout_s: float) -> Connection:
    """Connect to the front end, retrying while it starts listening."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client((addr.host, addr.port), authkey=addr.authkey)
        except (ConnectionRefusedError, OSError) as err:
            if time.monotonic() > deadline:
                raise ChannelTimeout(f"could not reach the front end at {addr.host}:{addr.port} within "
                                     f"{timeout_s:.0f} s: {err}") from err
            time.sleep(0.05)


def send(conn: Connection, msg: tuple, who: str) -> None:
    try:
        conn.send(msg)
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as err:
        raise ChannelClosed(f"{who}: connection closed ({type(err).__name__})") from err


def recv(conn: Connection, timeout_s: float | None, who: str, alive=None) -> tuple:
    """The next message. Waits at most timeout_s (None: forever, for an idle server), checking
    `alive()` (raises if the peer process died) every 0.5 s."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        try:
            if conn.poll(wait):
                return conn.recv()
        except (EOFError, ConnectionResetError, OSError) as err:
            raise ChannelClosed(f"{who}: connection closed ({type(err).__name__})") from err
        if alive is not None:
            alive()
        if deadline is not None and time.monotonic() >= deadline:
            raise ChannelTimeout(f"{who}: no message within {timeout_s:.0f} s")
