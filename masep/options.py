"""Where a command's settings come from, and which of them a strategy takes.

Three sources, later ones winning: `--config FILE` (TOML whose keys are the command's long
flag names, with dashes or underscores, and typed values), `--plan FILE|NOTATION` (a plan file
of `masep plan --out`, or the plan notation itself: it sets --strategy and the plan's flags),
and the command line. A flag set by two sources that disagree is an error naming both, and a
flag that belongs to another strategy than the one chosen is refused (it used to be ignored:
`masep run --tp 2 --pp 2` ran `single`). Everything here runs before any work starts; errors
are ValueErrors the commands turn into exit 2.
"""
from __future__ import annotations

import argparse
import logging

from .files import read_toml

DISTRIBUTED = ("separated", "tp_pp", "ep")
# dest -> the strategies whose flag it is (flags not listed work with every strategy)
STRATEGY_FLAGS = {
    "attn_replicas": ("separated",), "attn_tp": ("separated",), "expert_ranks": ("separated",),
    "seq_split": ("separated",), "placement": ("separated", "ep"),
    "tp": ("tp_pp",), "pp": ("tp_pp",), "ep": ("ep",),
    "microbatches": DISTRIBUTED,
    "backend": DISTRIBUTED, "timeout": DISTRIBUTED, "inject_fault": DISTRIBUTED, "max_restarts": DISTRIBUTED,
    "join_timeout": ("separated",),  # serve: a replacement expert rank joins the survivors of a separated plan
    "protection": ("separated",),  # failover of attention replicas; an EP or TP x PP failure ends the engine
    "grad_compression": DISTRIBUTED, "gpus_per_node": DISTRIBUTED,  # train: gradient sync among ranks
    "fused": ("single",),
    "trace": ("single",) + DISTRIBUTED,
}
# per command, where it differs
COMMAND_FLAGS = {
    "train": {"microbatches": ("single",) + DISTRIBUTED},  # single: gradient accumulation over m micro-batches
    "serve": {"trace": DISTRIBUTED},
    "bench dist": {"trace": (), "seq_split": ()},
}
WHY_NOT = {
    ("serve", "trace"): "with strategy single the model runs on the server's own threads, which write no trace; "
                        "use `masep run --strategy single --trace DIR` or a distributed strategy",
    ("bench dist", "trace"): "bench dist writes no trace; use `masep run --trace DIR` with the same plan",
    ("bench dist", "seq_split"): "bench dist times decode steps only (no prefill to split)",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without the noise: no "(default: X)" where the help already
    says what the default is, nor for None, False or an empty list (an unset flag); a list default
    as it would be typed (1 8 24, not [1, 8, 24])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is argparse.SUPPRESS or default is None or default is False
                or default == []):
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)).replace("%", "%%")
            return f"{text} (default: {shown})"
        return super()._get_help_string(action)


# --- --config FILE -----------------------------------------------------------------------------------------
def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML file of this command's flags: keys are the long flag names (dashes or underscores), "
                        "values typed (batch = 8, check = true, prompt = [\"a\", \"b\"]); flags given on the "
                        "command line override it")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parser.parse_args(argv) with the --config file of the (sub)command filled in where the
    command line is silent. Sets args.given: the dests the command line or the file set."""
    target, rest = parser, list(argv)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is not None and rest and rest[0] in sub.choices:
        target, rest = sub.choices[rest[0]], rest[1:]
    if not any(a.dest == "config" for a in target._actions):
        return parser.parse_args(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(rest)[0].config
    values = {}
    if path is not None:
        try:
            values = config_values(target, path)
        except ValueError as err:
            target.error(str(err))
        for action in target._actions:
            if action.dest in values:
                action.required = False  # the file gives it
    args = parser.parse_args(argv)
    given = given_on_command_line(target, rest)
    for group in target._mutually_exclusive_groups:  # --model on the command line beats the file's preset
        if any(a.dest in given for a in group._group_actions):
            for a in group._group_actions:
                values.pop(a.dest, None)
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)
    args.given, args.config_given = given | set(values), set(values) - given
    return args


def config_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """{dest: typed value} of a --config file; ValueError names an unknown key (and the valid
    ones) or a value of the wrong type."""
    doc = read_toml(path, "--config")
    by_key = {}
    for action in parser._actions:
        if action.dest in ("help", "config", "version") or not action.option_strings:
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                by_key[opt[2:]] = by_key[opt[2:].replace("-", "_")] = action
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            raise ValueError(f"--config {path}: [{key}] is a table; the file holds this command's flags only "
                             "(key = value lines, no [sections])")
        action = by_key.get(key)
        if action is None:
            valid = sorted({a.option_strings[-1][2:] for a in by_key.values()})
            raise ValueError(f"--config {path}: unknown key {key!r}; valid keys (this command's flags): "
                             f"{', '.join(valid)}")
        if action.dest in out:
            raise ValueError(f"--config {path}: {key!r} sets {action.option_strings[-1]} a second time")
        out[action.dest] = _typed(action, key, value, path)
    for group in parser._mutually_exclusive_groups:
        both = [a.option_strings[-1] for a in group._group_actions if a.dest in out]
        if len(both) > 1:
            raise ValueError(f"--config {path}: {' and '.join(both)} exclude each other; keep one")
    return out


def _typed(action: argparse.Action, key: str, value, path: str):
    where = f"--config {path}: {key} = {value!r}"
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false ({action.option_strings[-1]} is a switch)")
        return action.const if value else action.default
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, where, v) for v in items]
    if isinstance(value, list):
        raise ValueError(f"{where}: {action.option_strings[-1]} takes one value, not a list")
    return _scalar(action, where, value)


def _scalar(action: argparse.Action, where: str, value):
    kind = action.type
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(f"{where}: must be {_kind_name(kind)}")
    if kind is None or kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string (in quotes)")
    elif kind is int:
        if not isinstance(value, int):
            raise ValueError(f"{where}: must be an integer")
    elif kind is float:
        if not isinstance(value, (int, float)):
            raise ValueError(f"{where}: must be a number")
        value = float(value)
    else:
        try:
            value = kind(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: must be one of {', '.join(map(str, action.choices))}")
    return value


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a number"}.get(kind, "a string (in quotes)" if kind in (None, str) else
                                                        "a single value")


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Dests that `argv` itself sets (defaults left out): the same parse with every default
    suppressed, so `--tp 1` counts as given even though 1 is the default."""
    saved = [(a, a.default, a.required) for a in parser._actions]
    defaults, parser._defaults = parser._defaults, {}
    try:
        for action in parser._actions:
            action.default, action.required = argparse.SUPPRESS, False
        namespace = parser.parse_known_args(argv)[0]
    finally:
        parser._defaults = defaults
        for action, default, required in saved:
            action.default, action.required = default, required
    return set(vars(namespace))


def given_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> set[str]:
    """args.given (set by parse_args), or, for args parsed without it, the dests whose value
    differs from the parser's default."""
    given = getattr(args, "given", None)
    if given is None:
        given = {a.dest for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)
                 and hasattr(args, a.dest) and getattr(args, a.dest) != a.default}
        args.given = given
    return given


# --- --plan and the strategy rules --------------------------------------------------------------------------
def plan_flags(plan) -> dict:
    """The flag values (dests) that set `plan` from the command line."""
    from .plan import format_placement
    out = {"strategy": plan.strategy}
    if plan.strategy == "separated":
        out.update(attn_replicas=plan.attn_replicas, attn_tp=plan.attn_tp, expert_ranks=plan.expert_ranks)
        if plan.seq_split:
            out["seq_split"] = True
    elif plan.strategy == "tp_pp":
        out.update(tp=plan.tp, pp=plan.pp)
    elif plan.strategy == "ep":
        out["ep"] = plan.ep
    if plan.strategy != "single" or plan.microbatches != 1:
        out["microbatches"] = plan.microbatches
    if getattr(plan, "placement", None) is not None:
        out["placement"] = format_placement(plan.placement)
    return out


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[-1]
    return "--" + dest.replace("_", "-")


def _same(dest: str, a, b) -> bool:
    if dest == "placement" and a is not None and b is not None:
        from .plan import parse_placement
        try:
            return parse_placement(a) == parse_placement(b)
        except ValueError:
            return False
    return a == b


def apply_plan(args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str]) -> str | None:
    """--plan: set --strategy and the plan's flags (and the model it was planned for, when no
    --preset/--model is given). A given flag that disagrees is an error naming both; returns a
    note for stderr when the plan was made for another model than the one given."""
    from .plan import format_plan, load_plan
    plan, doc = load_plan(args.plan)
    shown = f"--plan {args.plan}" + ("" if doc is None else f" ({format_plan(plan)})")
    for dest, value in plan_flags(plan).items():
        flag = _flag(parser, dest)
        if not hasattr(args, dest):
            raise ValueError(f"{shown}: sets {flag}, which this command does not take (a plan for another "
                             "command?); drop it from the plan")
        if dest in given and not _same(dest, getattr(args, dest), value):
            raise ValueError(f"{flag} {_show(getattr(args, dest))} conflicts with {shown}, which sets {flag} "
                             f"{_show(value)}; drop one of them or make them agree")
        setattr(args, dest, value)
        given.add(dest)
    planned = (doc or {}).get("planned_for", {})
    mine = {k: planned[k] for k in ("preset", "model") if isinstance(planned.get(k), str)}
    if not mine:
        return None
    if not ({"preset", "model"} & given):
        for key, value in mine.items():
            setattr(args, key, value)
        return None
    chosen = ("--model", args.model) if args.model is not None else ("--preset", args.preset)
    if (chosen[0][2:], chosen[1]) in mine.items():
        return None
    return (f"note: {args.plan} was planned for {' '.join(f'--{k} {v}' for k, v in mine.items())}; running it "
            f"on {chosen[0]} {chosen[1]}")


def _show(value) -> str:
    return repr(value) if isinstance(value, str) and any(c in value for c in " ;") else str(value)


def check_strategy_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str], command: str,
                         strategy_source: str) -> None:
    """ValueError for the first given flag that the chosen strategy does not take."""
    rules = {**STRATEGY_FLAGS, **COMMAND_FLAGS.get(command, {})}
    strategy = args.strategy
    if strategy is None:  # bench dist without --strategy: it says so itself
        return
    for action in parser._actions:
        dest = action.dest
        if dest not in given or dest not in rules or strategy in rules[dest]:
            continue
        flag, value = action.option_strings[-1], getattr(args, dest)
        shown = (flag if action.nargs == 0 else f"{flag} {_show(value)}") + (
            f" (from --config {args.config})" if dest in getattr(args, "config_given", ()) else "")
        if not rules[dest]:
            raise ValueError(f"{shown}: masep {command} does not take it ({WHY_NOT.get((command, dest), '')})"
                             .replace(" ()", ""))
        owners = rules[dest]
        fix = WHY_NOT.get((command, dest)) or (
            f"use --strategy {owners[0]} or drop {flag}" if len(owners) == 1 else
            f"use one of those strategies or drop {flag}")
        raise ValueError(f"{shown}: a flag of strateg{'y' if len(owners) == 1 else 'ies'} {', '.join(owners)}, but "
                         f"the strategy is {strategy} ({strategy_source}); {fix}")


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> None:
    """--plan applied and the strategy rules checked, before any work; a violation exits 2."""
    given = given_flags(args, parser)
    try:
        source = ("the default" if "strategy" not in given else
                  f"--config {args.config}" if "strategy" in getattr(args, "config_given", ()) else "--strategy")
        if getattr(args, "plan", None) is not None:
            note = apply_plan(args, parser, given)
            if note:
                logging.getLogger("masep.options").warning(note)
            source = f"--plan {args.plan}"
        check_strategy_flags(args, parser, given, command, source)
    except ValueError as err:
        parser.error(str(err))
