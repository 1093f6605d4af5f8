"""Fit the all-reduce link constants of a hardware profile to a multi-GPU run, and write the profile.

    python benchmarks/fit_comm.py ROWS.jsonl [ROWS.jsonl ...] --base h200 --presets paper-swiglu \
        --out benchmarks/results/h200x4_fitted_comm_20261127.toml

Reads the `tp_pp` rows with one pipeline stage (TP = all GPUs of the run) of
benchmarks/multi_gpu.py: each decode step runs 2 all-reduces per layer of `batch x hidden`
activations. The per-call time (the op's wall time per step / calls per step, averaged over
ranks) is fitted to the ring model the cost model uses,
    t = 2(n-1) * latency + 2(n-1)/n * bytes / bandwidth,
by least squares, and written as `nvlink_latency_s` / `nvlink_bytes_per_s` over the base profile.
The op's wall time includes the runtime's host overhead around the collective (launch, the
wait); the fitted latency therefore describes masep's runtime on that host, not NCCL alone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from masep.config import preset


def points(paths: list[str], presets: set[str]) -> list[tuple[int, float, int]]:
    """(ranks, bytes per all-reduce, seconds per all-reduce) of every usable row."""
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            plan = row.get("plan") or {}
            if (row.get("kind") != "decode" or row.get("strategy") != "tp_pp" or plan.get("pp") != 1
                    or row.get("preset") not in presets
                    or row.get("median_tpot_ms", row.get("tpot_ms_median")) is None):  # older rows: tpot_ms_median
                continue
            cfg = preset(row["preset"])
            calls = 2 * cfg.num_layers * plan["microbatches"]
            busy = [r["allreduce"] for r in row["busy_ms_per_step"].values() if "allreduce" in r]
            nbytes = row["batch"] // plan["microbatches"] * cfg.hidden_size * 2  # bf16 activations
            out.append((plan["tp"], nbytes, sum(busy) / len(busy) / calls / 1e3))
    return out


def fit(pts: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Least squares of t = a * 2(n-1) + b * 2(n-1)/n * bytes -> (latency a, bandwidth 1/b)."""
    xs = [(2 * (n - 1), 2 * (n - 1) / n * nbytes) for n, nbytes, _ in pts]
    ys = [t for _, _, t in pts]
    s11 = sum(x1 * x1 for x1, _ in xs)
    s12 = sum(x1 * x2 for x1, x2 in xs)
    s22 = sum(x2 * x2 for _, x2 in xs)
    t1 = sum(x1 * y for (x1, _), y in zip(xs, ys))
    t2 = sum(x2 * y for (_, x2), y in zip(xs, ys))
    det = s11 * s22 - s12 * s12
    if len(pts) < 2 or det <= 0:
        raise ValueError(f"need at least 2 points with different message sizes, got {len(pts)}")
    a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
    if a < 0 or b <= 0:
        raise ValueError(f"fit gave latency {a:.3g} s and inverse bandwidth {b:.3g} s/B: not physical")
    return a, 1.0 / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+")
    parser.add_argument("--base", default="h200")
    parser.add_argument("--presets", nargs="+", default=["paper", "paper-swiglu"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pts = points(args.rows, set(args.presets))
    latency, bandwidth = fit(pts)
    for n, nbytes, t in pts:
        model = 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth
        print(f"TP{n} all-reduce of {nbytes / 1e3:8.1f} kB: measured {t * 1e6:8.1f} us, fitted {model * 1e6:8.1f} us")
    text = (f'# all-reduce constants fitted by benchmarks/fit_comm.py to {", ".join(args.rows)}\n'
            f'# ({len(pts)} points; includes masep runtime overhead around each collective)\n'
            f'base = "{args.base}"\nnvlink_latency_s = {latency:.6g}\nnvlink_bytes_per_s = {bandwidth:.6g}\n'
            f'source = "fitted to {Path(args.rows[0]).name}"\n')
    Path(args.out).write_text(text)
    print(f"latency {latency * 1e6:.1f} us per ring step, bandwidth {bandwidth / 1e9:.1f} GB/s -> wrote {args.out}")


if __name__ == "__main__":
    main()
