"""Predicted vs measured per-rank op times: how well the cost model fits a calibration file.

For every `attention` / `experts` measurement of a calibration document (masep.perf.bench),
the cost model predicts the op's time from the same bytes and FLOPs on a hardware profile:
the built-in one, and the same profile refitted to the document (hardware.apply_calibration).
The refitted prediction is an in-sample fit (the rows it is scored on are the rows it was fitted
to), so it shows whether latency + roofline/efficiency can describe the measurements at all;
the built-in prediction shows how far off the uncalibrated model is.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import read_json
from .costmodel import roofline_s
from .hardware import COMPUTE_KINDS, apply_calibration, get_profile


def compare(doc: dict, hardware: str) -> list[dict]:
    base = get_profile(hardware)
    fitted = apply_calibration(base, doc)
    rows = []
    for m in doc.get("measurements", []):
        if m.get("op") not in COMPUTE_KINDS:
            continue
        measured = m["measured_ms"]
        before = roofline_s(base, m["op"], m["bytes"], m["flops"]) * 1e3
        after = roofline_s(fitted, m["op"], m["bytes"], m["flops"]) * 1e3
        rows.append(dict(op=m["op"], preset=m["preset"], plan=m["plan"], batch=m["batch"], heads=m["heads"],
                         experts=m["experts"], measured_ms=measured, predicted_ms=before, calibrated_ms=after,
                         error=before / measured - 1, calibrated_error=after / measured - 1))
    return rows


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
    lines = [f"{'op':<10}{'preset':<14}{'plan':<12}{'batch':>6}{'heads':>6}{'exp':>4}{'measured':>10}"
             f"{'built-in':>10}{'err':>8}{'refit':>9}{'err':>8}"]
    for r in rows:
        lines.append(f"{r['op']:<10}{r['preset']:<14}{r['plan']:<12}{r['batch']:>6}{r['heads']:>6}{r['experts']:>4}"
                     f"{r['measured_ms']:>10.4f}{r['predicted_ms']:>10.4f}{r['error']:>+8.0%}"
                     f"{r['calibrated_ms']:>9.4f}{r['calibrated_error']:>+8.0%}")
    return "\n".join(lines)


def add_calcheck_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calcheck", help="cost model vs a calibration file: predicted and measured per op")
    p.add_argument("calibration", help="calibration JSON written by `masep bench calibrate`")
    p.add_argument("--hardware", default="h100", help="built-in profile to compare and refit (a100-80g, h100, h200)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calcheck)
    return p


def cmd_calcheck(args) -> int:
    path = Path(args.calibration)
    try:
        doc = read_json(path, "calibration")
        rows = compare(doc, args.hardware)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"masep calcheck: error: {err}")
    if args.json:
        print(json.dumps(dict(rows=rows, summary=summary(rows))))
    else:
        print(f"{path} ({doc.get('device')}, {doc.get('date')}) against profile {args.hardware}; 'refit' is the "
              "profile refitted to this file (in-sample)")
        print(format_table(rows))
        for kind, s in summary(rows).items():
            print(f"{kind}: {s['points']} points, built-in max |error| {s['max_abs_error']:.0%}, refitted max |error| "
                  f"{s['max_abs_calibrated_error']:.0%}, {s['within_10pct_calibrated']} within 10%")
    return 0
