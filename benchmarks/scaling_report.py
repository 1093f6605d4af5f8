"""Scaling from 1 to N GPUs of one host: every measured row beside its floor, the simulator's
raw prediction and the calibrated prediction written before the run, and where separation wins.

    python benchmarks/scaling_report.py --tag h200x4_20261130

Reads, under benchmarks/results/:
  scaling_<tag>_1gpu.json    one GPU (`masep bench decode ... --impl triton+fused`)
  scaling_<tag>_2gpu.jsonl   every 2-GPU plan (benchmarks/multi_gpu.py --all-ratios)
  scaling_<tag>_4gpu.jsonl   every 4-GPU plan (same), and _8gpu.jsonl where one exists
  --predictions              predict_scaling's file, calibrated on 1- and 2-GPU rows of an earlier
                             lease only and committed before any 4- or 8-GPU run
Writes scaling_<tag>.json (rows, summaries) and scaling_<tag>.md.

tokens/s = batch / median TPOT for every row. Scaling efficiency = (tokens/s per GPU) / (one
GPU's tokens/s) at the same point; the best
plan of a family is the one with the lowest TPOT at that point and GPU count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))

from masep.perf.costmodel import plan_from_dict  # noqa: E402
from masep.plan import format_plan  # noqa: E402

POINTS = [(24, 2048), (128, 2048), (512, 2048), (2048, 512)]
WITHIN = 0.15  # the target for the out-of-sample error
HOW = ("bf16; TPOT = median of 40 decode steps after 3 warm-ups, CUDA events, the slowest rank per step. "
       "1 GPU: `masep bench decode --impl triton+fused` on GPU 0; 2 GPUs: `benchmarks/multi_gpu.py "
       "--all-ratios` on GPUs 0-1; 4 GPUs: the same on all four; all in one lease. floor: perf/floor.py with "
       "the copy bandwidth measured in the run and the profile's collective times; J/token: NVML energy of "
       "every GPU of the plan over the timed steps / tokens; simulated: the simulator's raw TPOT (h200 "
       "profile); calibrated: `predict_scaling_h200_20261130.md`, written before any 4-GPU run; "
       "error = calibrated / measured - 1; efficiency = tok/s per GPU / one GPU's tok/s.")


def load_rows(tag: str) -> list[dict]:
    """One dict per measured (preset, point, plan): gpus, plan, tpot_ms, tok_s, joules_per_token,
    floor_ms, floor_ratio, simulated_ms."""
    out = []
    one = json.loads((RESULTS / f"scaling_{tag}_1gpu.json").read_text())["rows"]
    for r in one:
        out.append(dict(preset=r["preset"], batch=r["batch"], context=r["context"], gpus=1, plan="one GPU",
                        family="one", tpot_ms=r["tpot_ms_median"], tok_s=r["batch"] / r["tpot_ms_median"] * 1e3,
                        joules_per_token=r.get("joules_per_token"), floor_ms=r["floor_ms"],
                        floor_ratio=r["tpot_ms_median"] / r["floor_ms"], simulated_ms=None))
    for gpus in (2, 4, 8):
        path = RESULTS / f"scaling_{tag}_{gpus}gpu.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") != "decode" or r.get("error"):
                continue
            # rows of 2026-11-30 carry the plan's cached hash ("_hash"), not a field
            plan = plan_from_dict({k: v for k, v in r["plan"].items() if not k.startswith("_")})
            out.append(dict(preset=r["preset"], batch=r["batch"], context=r["context"], gpus=gpus,
                            plan=format_plan(plan), family=family(plan), tpot_ms=r["median_tpot_ms"],
                            tok_s=r["batch"] / r["median_tpot_ms"] * 1e3, joules_per_token=r.get("joules_per_token"),
                            floor_ms=r.get("floor_ms"), floor_ratio=r.get("floor_ratio"),
                            simulated_ms=r.get("predicted_tpot_ms")))
    return out


def family(plan) -> str:
    if plan.strategy == "tp_pp":
        return "tp" if plan.pp == 1 else "pp" if plan.tp == 1 else "tp_pp"
    return plan.strategy


def attach_predictions(rows: list[dict], predictions: dict, label: str = "predictions", primary: bool = True) -> None:
    """Each row's prediction from one file written before the run, and its error, under
    row["checks"][label]; the primary file's also as calibrated_ms / calibrated_error."""
    made = {(p["preset"], p["batch"], p["context"], p["plan"]): p for p in predictions["rows"]}
    for r in rows:
        p = made.get((r["preset"], r["batch"], r["context"], r["plan"]))
        if not (p and p.get("calibrated_ms")):
            continue
        check = dict(calibrated_ms=p["calibrated_ms"], error=p["calibrated_ms"] / r["tpot_ms"] - 1)
        r.setdefault("checks", {})[label] = check
        if primary:
            r["calibrated_ms"], r["calibrated_error"] = check["calibrated_ms"], check["error"]
            r["factor_from"] = p.get("factor_from")


def attach_efficiency(rows: list[dict]) -> None:
    one = {(r["preset"], r["batch"], r["context"]): r["tok_s"] for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one.get((r["preset"], r["batch"], r["context"]))
        r["efficiency"] = r["tok_s"] / r["gpus"] / base if base else None


def best_of(rows: list[dict], separated: bool) -> dict | None:
    pick = [r for r in rows if (r["family"] == "separated") == separated]
    return min(pick, key=lambda r: r["tpot_ms"]) if pick else None


def wins(rows: list[dict]) -> list[dict]:
    """Per (preset, point, GPU count > 1): the best separated plan against the best baseline."""
    out = []
    keys = sorted({(r["preset"], r["batch"], r["context"], r["gpus"]) for r in rows if r["gpus"] > 1})
    for preset, b, c, g in keys:
        here = [r for r in rows if (r["preset"], r["batch"], r["context"], r["gpus"]) == (preset, b, c, g)]
        sep, base = best_of(here, True), best_of(here, False)
        if sep and base:
            out.append(dict(preset=preset, batch=b, context=c, gpus=g, best_separated=sep["plan"],
                            separated_ms=sep["tpot_ms"], separated_floor_ms=sep["floor_ms"],
                            best_baseline=base["plan"], baseline_ms=base["tpot_ms"],
                            baseline_floor_ms=base["floor_ms"], speedup=base["tpot_ms"] / sep["tpot_ms"],
                            floor_speedup=(base["floor_ms"] / sep["floor_ms"]
                                           if sep["floor_ms"] and base["floor_ms"] else None)))
    return out


def error_summary(rows: list[dict], gpus: int, label: str = "predictions") -> dict:
    by = {}
    for r in rows:
        if r["gpus"] == gpus and label in r.get("checks", {}):
            by.setdefault(r["preset"], []).append((r["family"], r["checks"][label]["error"]))
    out = {}
    for preset, rs in by.items():
        errs = sorted(abs(e) for _, e in rs)
        fams = {}
        for fam, e in rs:
            fams.setdefault(fam, []).append(e)
        out[preset] = dict(rows=len(rs), within=sum(e <= WITHIN for e in errs), median_abs=statistics.median(errs),
                           largest_abs=errs[-1],
                           by_family={f: dict(median=statistics.median(v), rows=len(v)) for f, v in fams.items()})
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(tag: str, rows: list[dict], errors: dict, duel: list[dict], meta: dict) -> str:
    lines = [f"# Decode scaling on {meta['host']} ({meta['date']})", "", meta["how"], ""]
    for preset in sorted({r["preset"] for r in rows}):
        lines += [f"## `{preset}`", "",
                  "| batch x context | GPUs | plan | TPOT ms | tok/s | J/token | floor ms | / floor | simulated ms | "
                  "calibrated ms (before the run) | error | efficiency |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for b, c in POINTS:
            for r in sorted((r for r in rows if (r["preset"], r["batch"], r["context"]) == (preset, b, c)),
                            key=lambda r: (r["gpus"], r["tpot_ms"])):
                lines.append(f"| {b} x {c} | {r['gpus']} | {r['plan']} | {r['tpot_ms']:.2f} | {r['tok_s']:,.0f} | "
                             f"{_f(r['joules_per_token'], '{:.3f}')} | {_f(r['floor_ms'])} | {_f(r['floor_ratio'])} | "
                             f"{_f(r['simulated_ms'])} | {_f(r.get('calibrated_ms'))} | "
                             f"{_f(r.get('calibrated_error'), '{:+.0%}')} | {_f(r['efficiency'])} |")
        lines.append("")
    lines += ["## The simulator out of sample", "",
              "Each file of predictions was written before the runs it is checked against (the first: "
              "`predict_scaling_h200_20261130.md`, factors from 2-GPU rows of an earlier lease). "
              "Error = calibrated / measured - 1.", "",
              "| predictions | GPUs | preset | rows | within 15% | median abs error | largest | median error by family |",
              "|---|---|---|---|---|---|---|---|"]
    for (label, gpus), by_preset in errors.items():
        for preset, e in by_preset.items():
            fams = ", ".join(f"{f} {v['median']:+.0%} ({v['rows']})" for f, v in sorted(e["by_family"].items()))
            lines.append(f"| `{label}` | {gpus} | {preset} | {e['rows']} | {e['within']} | {e['median_abs']:.0%} | "
                         f"{e['largest_abs']:.0%} | {fams} |")
    lines += ["", "## Best separated plan against the best baseline", "",
              "speedup = best baseline TPOT / best separated TPOT (> 1: separation wins); floor speedup = the same "
              "ratio of the two plans' floors (what physics allows them).", "",
              "| preset | batch x context | GPUs | best separated | ms | best baseline | ms | speedup | floor speedup |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in duel:
        lines.append(f"| {d['preset']} | {d['batch']} x {d['context']} | {d['gpus']} | {d['best_separated']} | "
                     f"{d['separated_ms']:.2f} | {d['best_baseline']} | {d['baseline_ms']:.2f} | "
                     f"{d['speedup']:.2f} | {_f(d['floor_speedup'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True, help="the files' host kind and date, e.g. h200x4_20261130")
    p.add_argument("--predictions", nargs="+", default=[str(RESULTS / "predict_scaling_h200_20261130.json")],
                   help="predict_scaling files, each written before the runs it is checked against; the first "
                        "fills the main table's calibrated column")
    p.add_argument("--host", default="4 x NVIDIA H200 of one host (NVLink, NV18 between every pair)")
    args = p.parse_args()
    rows = load_rows(args.tag)
    labels = [Path(f).stem for f in args.predictions]
    for i, (label, path) in enumerate(zip(labels, args.predictions)):
        attach_predictions(rows, json.loads(Path(path).read_text()), label, primary=i == 0)
    attach_efficiency(rows)
    errors = {(label, g): e for label in labels for g in (4, 8) if (e := error_summary(rows, g, label))}
    duel = wins(rows)
    gpus_txt = RESULTS / f"scaling_{args.tag}_gpus.txt"
    meta = dict(tag=args.tag, host=args.host, date=args.tag.rsplit("_", 1)[-1],
                versions=gpus_txt.read_text().splitlines()[-2] if gpus_txt.exists() else None,
                how=HOW)
    stem = RESULTS / f"scaling_{args.tag}"
    out_of_sample = {f"{label} {g} GPUs": e for (label, g), e in errors.items()}
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, out_of_sample=out_of_sample,
                                                         duel=duel), indent=1))
    stem.with_suffix(".md").write_text(markdown(args.tag, rows, errors, duel, meta))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
