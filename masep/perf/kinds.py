"""`masep plan` on one or two kinds of GPU, with prices: the flags, their checks, and the --kinds table.

  --price KIND=USD,...       USD per GPU-hour of each hardware profile; every plan then reports
                             usd_per_hour and usd_per_m_output_tokens, and under --tpot-limit-ms the
                             plans are ranked by cost per million output tokens
  --attn-hardware KIND       a separated plan with its attention ranks on KIND and its expert ranks
  --expert-hardware KIND     on KIND (either one alone: the other group stays on --hardware)
  --kinds A,B                search every way of using the kinds: each alone (every strategy), and
                             separated plans with attention on one and experts on the other; needs
                             --price and --tpot-limit-ms; prints the best of each, cheapest first

The GPU count (--gpus) is the total; a split's counts and ratio are the planner's choice.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import MixedHardware, load_hardware
from .pricing import parse_prices, plan_cost


def add_kind_args(p) -> None:
    p.add_argument("--price", metavar="KIND=USD,...", default=None,
                   help="USD per GPU-hour of each hardware profile (e.g. h100=2.1,h200=3.4): every plan reports its "
                        "cost per million output tokens, and with --tpot-limit-ms plans are ranked by it")
    p.add_argument("--attn-hardware", metavar="KIND", default=None,
                   help="run a separated plan's attention ranks on this profile (expert ranks on --expert-hardware, "
                        "else --hardware); separated plans only")
    p.add_argument("--expert-hardware", metavar="KIND", default=None,
                   help="run a separated plan's expert ranks on this profile (attention ranks on --attn-hardware, "
                        "else --hardware); separated plans only")
    p.add_argument("--kinds", metavar="A,B", default=None,
                   help="try each profile alone and every separated split of attention and experts between them; "
                        "with --price and --tpot-limit-ms, finds the cheapest per million output tokens "
                        "(replaces --hardware)")


@dataclass
class Choice:
    """What the planner searches: one profile or a split (`hw`), or several options (--kinds)."""
    hw: object  # Hardware | MixedHardware
    options: list  # [(label, Hardware | MixedHardware)] with --kinds, else []
    strategies: tuple[str, ...]
    prices: dict[str, float] | None


def option_label(hw) -> str:
    if isinstance(hw, MixedHardware):
        return f"attention {hw.attention.name} + experts {hw.experts.name}"
    return f"{hw.name} only"


def hardware_choice(args, hw, strategies: tuple[str, ...]) -> Choice:
    """The hardware flags of `masep plan` as a Choice; ValueError naming the flag, value and rule."""
    kinds, attn, expert = args.kinds, args.attn_hardware, args.expert_hardware
    prices = parse_prices(args.price) if args.price else None
    split = attn is not None or expert is not None
    if kinds and split:
        raise ValueError("--kinds searches every split itself: leave out --attn-hardware / --expert-hardware")
    if (kinds or split) and args.calibration:
        raise ValueError("--calibration fits one profile: it cannot apply to --kinds, --attn-hardware or "
                         "--expert-hardware; put the fitted rates in a profile file instead")
    if split or kinds:
        if args.train:
            raise ValueError("--kinds, --attn-hardware and --expert-hardware plan decode, not --train")
    load = lambda name: load_hardware(name, None, args.gpus_per_node)  # noqa: E731
    if kinds:
        names = [k.strip() for k in kinds.split(",") if k.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"--kinds {kinds!r}: name two or more different profiles, e.g. h100,h200")
        if prices is None or args.tpot_limit_ms is None:
            raise ValueError("--kinds ranks by cost per million output tokens under a latency target: give --price "
                             "and --tpot-limit-ms")
        profiles = [load(n) for n in names]
        options = [(option_label(p), p) for p in profiles]
        options += [(option_label(m), m) for m in (MixedHardware(a, e) for a in profiles for e in profiles if a != e)
                    if "separated" in strategies]
        _check_priced(prices, profiles)
        return Choice(profiles[0], options, strategies, prices)
    if split:
        a, e = load(attn) if attn else hw, load(expert) if expert else hw
        if a == e:
            raise ValueError(f"--attn-hardware / --expert-hardware: both groups on {a.name} is --hardware {a.name}")
        if args.strategies and set(strategies) != {"separated"}:
            raise ValueError(f"--strategies {args.strategies}: attention and experts on two kinds of GPU is a "
                             "separated plan; use --strategies separated or leave it out")
        hw, strategies = MixedHardware(a, e), ("separated",)
        if prices:
            _check_priced(prices, [a, e])
    elif prices:
        _check_priced(prices, [hw])
    return Choice(hw, [], strategies, prices)


def _check_priced(prices: dict[str, float], profiles) -> None:
    missing = sorted({p.name for p in profiles} - set(prices))
    if missing:
        raise ValueError(f"--price has no price for {', '.join(missing)} (priced: {', '.join(sorted(prices))}); add "
                         f"{missing[0]}=USD_PER_GPU_HOUR")


def cost_fields(sim, prices) -> dict:
    """usd_per_hour and usd_per_m_output_tokens of a simulation, or nothing without prices."""
    return plan_cost(sim, prices) if prices else {}


def search_options(cfg, choice: Choice, gpus: int, work, tpot_limit_s: float, *, max_batch: int,
                   max_microbatches: int, overlap: bool) -> list[tuple[str, object]]:
    """--kinds: the cheapest plan (under the TPOT limit) of each hardware option, cheapest first;
    (label, Simulation or None when nothing meets the limit)."""
    from .throughput import search_throughput
    rows = []
    for label, option in choice.options:
        res = search_throughput(cfg, option, gpus, work.context, tpot_limit_s, max_batch=max_batch,
                                strategies=choice.strategies, top=1, max_microbatches=max_microbatches,
                                lm_head=work.lm_head, overlap=overlap, prices=choice.prices, dispatch=work.dispatch)
        rows.append((label, res.ranked[0] if res.ranked else None))
    return sorted(rows, key=lambda r: (r[1] is None, plan_cost(r[1], choice.prices)["usd_per_m_output_tokens"]
                                       if r[1] is not None else 0.0))


def split_words(sim) -> str:
    """'attention 24 x h200, experts 8 x h100 (3:1)' for a split; 'h100 x 32' otherwise."""
    if not isinstance(sim.hw, MixedHardware):
        return f"{sim.num_gpus} x {sim.hw.name}"
    a, e = sim.plan.num_attention_ranks, sim.plan.expert_ranks
    return (f"attention {a} x {sim.hw.attention.name}, experts {e} x {sim.hw.experts.name} "
            f"(attention:experts = {a / e:.2g}:1)")
