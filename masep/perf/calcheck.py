"""Predicted vs measured per-rank op times: how well the cost model fits a calibration file.

For every `attention` / `experts` measurement of a calibration document (masep.perf.bench),
the cost model predicts the op's time from the same bytes and FLOPs on a hardware profile:
the built-in one, and the same profile refitted to the document (hardware.apply_calibration).
By default the refitted prediction is an in-sample fit (the rows it is scored on are the rows
it was fitted to), so it shows whether latency + roofline/efficiency can describe the
measurements at all; `holdout_batches` refits on the other batches and scores only the held-out
ones, which is what a planner predicting an unmeasured batch size relies on. The built-in
prediction shows how far off the uncalibrated model is.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import read_json
from .costmodel import roofline_s
from .hardware import COMPUTE_KINDS, apply_calibration, get_profile


def compare(doc: dict, hardware: str, holdout_batches: set[int] | None = None) -> list[dict]:
    """One row per measured op. With `holdout_batches`, the refit sees only the other batches
    and only the held-out rows are scored: an out-of-sample check of the refitted model."""
    base = get_profile(hardware)
    measurements = doc.get("measurements", [])
    if holdout_batches:
        fit_on = [m for m in measurements if m.get("batch") not in holdout_batches]
        scored = [m for m in measurements if m.get("batch") in holdout_batches]
        if not fit_on or not scored:
            raise ValueError(f"--holdout-batches {sorted(holdout_batches)}: the file's batches are "
                             f"{sorted({m.get('batch') for m in measurements})}; keep some to fit and some to score")
        fitted = apply_calibration(base, dict(doc, measurements=fit_on))
        measurements = scored
    else:
        fitted = apply_calibration(base, doc)
    rows = []
    for m in measurements:
        if m.get("op") not in COMPUTE_KINDS:
            continue
        measured = m["measured_ms"]
        before = roofline_s(base, m["op"], m["bytes"], m["flops"]) * 1e3
        after = roofline_s(fitted, m["op"], m["bytes"], m["flops"]) * 1e3
        rows.append(dict(op=m["op"], preset=m["preset"], plan=plan_label(m["plan"]), batch=m["batch"],
                         heads=m["heads"], experts=m["experts"], measured_ms=measured, predicted_ms=before,
                         calibrated_ms=after, error=before / measured - 1, calibrated_error=after / measured - 1))
    return rows


# labels of calibration files written before the one plan notation (benchmarks/results/*_20261127.json)
LEGACY_PLAN_LABELS = {"ma-12a4e": "sep 1x12+4 m1", "tp8pp2": "tp8pp2 m1"}


def plan_label(text: str) -> str:
    """A measurement's plan in the plan notation (older files' own labels translated)."""
    return LEGACY_PLAN_LABELS.get(text, text)


def summary(rows: list[dict]) -> dict:
    out = {}
    for kind in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == kind]
        out[kind] = dict(points=len(mine),
                         max_abs_error=max(abs(r["error"]) for r in mine),
                         max_abs_calibrated_error=max(abs(r["calibrated_error"]) for r in mine),
                         within_10pct_calibrated=sum(abs(r["calibrated_error"]) <= 0.10 for r in mine))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<10}{'preset':<14}{'plan':<15}{'batch':>6}{'heads':>6}{'exp':>4}{'measured ms':>12}"
             f"{'built-in ms':>12}{'err %':>7}{'refit ms':>10}{'err %':>7}"]
    for r in rows:
        lines.append(f"{r['op']:<10}{r['preset']:<14}{r['plan']:<15}{r['batch']:>6}{r['heads']:>6}{r['experts']:>4}"
                     f"{r['measured_ms']:>12.4f}{r['predicted_ms']:>12.4f}{r['error']:>+7.0%}"
                     f"{r['calibrated_ms']:>10.4f}{r['calibrated_error']:>+7.0%}")
    return "\n".join(lines)


def add_calcheck_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calcheck", help="cost model vs a calibration file: predicted and measured per op")
    p.add_argument("calibration", help="calibration JSON written by `masep bench calibrate`")
    p.add_argument("--hardware", default="h100", help="built-in profile to compare and refit (a100-80g, h100, h200)")
    p.add_argument("--holdout-batches", type=int, nargs="+", default=None,
                   help="refit on the other batches and score only these (out of sample)")
    p.add_argument("--json", action="store_true", help="print one JSON document ({meta, rows}) instead of the table")
    p.set_defaults(func=cmd_calcheck)
    return p


def cmd_calcheck(args) -> int:
    path = Path(args.calibration)
    try:
        doc = read_json(path, "calibration")
        holdout = set(args.holdout_batches) if args.holdout_batches else None
        rows = compare(doc, args.hardware, holdout)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"masep calcheck: error: {err}")
    if args.json:
        from ..report import document
        print(json.dumps(document("calcheck", rows, args, hardware=dict(profile=args.hardware),
                                  calibration=dict(path=str(path), device=doc.get("device"), date=doc.get("date")),
                                  holdout_batches=sorted(holdout) if holdout else None, summary=summary(rows))))
    else:
        sample = (f"refitted to the other batches, scored on batches {sorted(holdout)} (out of sample)" if holdout
                  else "refitted to this file (in-sample)")
        print(f"{path} ({doc.get('device')}, {doc.get('date')}) against profile {args.hardware}; 'refit' is the "
              f"profile {sample}")
        print(format_table(rows))
        for kind, s in summary(rows).items():
            print(f"{kind}: {s['points']} points, built-in max |error| {s['max_abs_error']:.0%}, refitted max |error| "
                  f"{s['max_abs_calibrated_error']:.0%}, {s['within_10pct_calibrated']} within 10%")
    return 0
