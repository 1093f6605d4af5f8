"""Markdown table of the decode-at-floor runs (benchmarks/run_dist_floor.sh).

    python benchmarks/dist_floor_report.py TWO_GPU.jsonl ONE_GPU.json [ONE_GPU.json ...] > OUT.md

TWO_GPU.jsonl: benchmarks/multi_gpu.py rows; ONE_GPU.json: `masep bench decode` documents (one
GPU, the best kernel set per point over all of them). Every row: median TPOT (CUDA events), tokens/s, the plan's floor at
the copy bandwidth measured in the same run, their ratio, the simulator's prediction, and joules
per token over every GPU of the plan (NVML energy counter).
"""
from __future__ import annotations

import json
import sys


def _one_gpu(paths: list[str]) -> dict:
    best = {}
    for r in [r for path in paths for r in json.load(open(path))["rows"]]:
        key = (r["batch"], r["context"])
        if key not in best or r["tpot_ms_median"] < best[key]["tpot_ms_median"]:
            best[key] = r
    return best


def main(two_path: str, *one_paths: str) -> None:
    one = _one_gpu(list(one_paths))
    two = [json.loads(line) for line in open(two_path) if line.strip()]
    meta = two[0]
    print(f"# Decode at each plan's floor: `paper` (bf16) on {meta['device']} x2, {meta['date']}\n")
    one_bw = sorted({r["copy_bw_measured"] / 1e12 for r in one.values()})
    two_bw = sorted({r["copy_bw_measured"] / 1e12 for r in two if r.get("copy_bw_measured")})
    matmul = sorted({r["matmul_flops_measured"] / 1e12 for r in two if r.get("matmul_flops_measured")})
    span = lambda v: f"{v[0]:.2f}" if f"{v[0]:.2f}" == f"{v[-1]:.2f}" else f"{v[0]:.2f}-{v[-1]:.2f}"  # noqa: E731
    flops = (f" and FLOPs over the bf16 matmul rate measured beside it ({span(matmul)} TFLOP/s; each op is bound "
             "by the larger)") if matmul else ""
    print(f"torch {meta['torch']}, NCCL {meta.get('nccl')}, CUDA-event times, {meta['steps']} timed steps per row. "
          "floor = perf/floor.py `plan_floor`: bytes over the HBM copy bandwidth measured in the same run "
          f"(one-GPU runs: {span(one_bw)} TB/s; two-GPU runs: {span(two_bw)} TB/s, measured on rank 0 before each "
          f"plan){flops}, transfers at the h200 profile's collective times; ratio = TPOT / floor; predicted = "
          "`masep simulate` (h200 profile). J/token: the energy of every GPU of the plan over the timed steps / "
          "tokens.\n")
    launch = any(r.get("median_from_launch_ms") for r in two)
    if launch:
        print("from launch = the same steps timed from the whole-step graph's launch, without the runtime's "
              "host preparation, which the one-GPU rows leave out too (TP x PP and EP plans).\n")
    extra = " from launch ms (ratio) |" if launch else ""
    print(f"| batch x context | plan | TPOT ms | tokens/s | vs one GPU | floor ms | ratio |{extra} predicted ms | J/token |")
    print("|---|---|---|---|---|---|---|" + ("---|" if launch else "") + "---|---|")
    for (batch, context), r1 in sorted(one.items(), key=lambda kv: (kv[0][1] != 2048, kv[0][0])):
        rows = [r for r in two if (r["batch"], r["context"]) == (batch, context)]
        if not rows:
            continue
        base = r1["tpot_ms_median"]
        print(f"| {batch} x {context} | one GPU ({r1['impl']}) | {base:.2f} | {r1['tps']:.0f} | 1.00x | "
              f"{r1['floor_ms']:.2f} | {base / r1['floor_ms']:.2f} |{' - |' if launch else ''} - | "
              f"{_joules(r1['joules_per_token'])} |")
        for r in rows:
            if r.get("error"):
                print(f"| {batch} x {context} | {r.get('plan_notation', r['plan_text'])} | error: {r['error'][:60]} |")
                continue
            t = r["median_tpot_ms"]
            from_launch = ""
            if launch:
                ms = r.get("median_from_launch_ms")
                from_launch = f" {ms:.2f} ({ms / r['floor_ms']:.2f}) |" if ms else " - |"
            print(f"| {batch} x {context} | {r['plan_notation']} | {t:.2f} | {batch / t * 1e3:.0f} | {base / t:.2f}x | "
                  f"{r['floor_ms']:.2f} | {r['floor_ratio']:.2f} |{from_launch} {r['predicted_tpot_ms']:.2f} | "
                  f"{_joules(r.get('joules_per_token'))} |")


def _joules(value) -> str:
    return f"{value:.3f}" if value is not None else "-"

if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
