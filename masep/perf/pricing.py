"""What a plan costs: USD per hour of its GPUs, and USD per million output tokens at its throughput.

Prices are the user's, per GPU-hour and per hardware profile (`--price h100=2.1,h200=3.4`); a plan
pays for the GPUs it uses, each at its own kind's price (MixedHardware: attention ranks at one
kind's, expert ranks at the other's):
    usd_per_hour           = sum over the plan's GPUs of their price
    usd_per_m_output_tokens = usd_per_hour / (output tokens/s * 3600) * 1e6
Output tokens/s is the simulated decode throughput (batch / TPOT): prefill, idle capacity and whole
nodes left partly empty are not charged.
"""
from __future__ import annotations

import math

from .hardware import PROFILES


def parse_prices(text: str, flag: str = "--price") -> dict[str, float]:
    """'h100=2.1,h200=3.4' -> {'h100': 2.1, 'h200': 3.4}, keyed by profile name (a built-in alias such as
    a100 becomes its profile's name); ValueError naming the flag, the item and the rule."""
    out: dict[str, float] = {}
    for item in (p.strip() for p in str(text).split(",")):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"{flag} {text!r}: item {item!r} is not KIND=USD_PER_GPU_HOUR (e.g. h100=2.1,h200=3.4)")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {name}={value!r} is not a number of USD per GPU-hour") from None
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"{flag} {text!r}: {name}={value}: a price must be a positive number of USD per GPU-hour")
        key = PROFILES[name].name if name in PROFILES else name
        if key in out:
            raise ValueError(f"{flag} {text!r}: {name} is priced twice")
        out[key] = price
    return out


def usd_per_hour(hw, world_size: int, prices: dict[str, float]) -> float:
    """Price of the plan's GPUs for one hour, each GPU at its own kind's price; ValueError when a
    kind the plan uses has no price."""
    total = 0.0
    for rank in range(world_size):
        name = hw.for_rank(rank).name
        if name not in prices:
            raise ValueError(f"--price has no price for {name} (priced: {', '.join(sorted(prices)) or 'none'}); "
                             f"add {name}=USD_PER_GPU_HOUR")
        total += prices[name]
    return total


def usd_per_million_tokens(hourly_usd: float, tokens_per_s: float) -> float:
    """USD per million output tokens at `tokens_per_s` for `hourly_usd` an hour."""
    return hourly_usd / (tokens_per_s * 3600.0) * 1e6


def plan_cost(sim, prices: dict[str, float]) -> dict:
    """A simulation's cost numbers: the row keys every command reports."""
    hourly = usd_per_hour(sim.hw, sim.num_gpus, prices)
    return dict(usd_per_hour=hourly, usd_per_m_output_tokens=usd_per_million_tokens(hourly, sim.tps))
