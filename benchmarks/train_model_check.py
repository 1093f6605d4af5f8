"""Hold the training simulator (perf/trainsim.py) against measured training steps.

Reads a results file of benchmarks/train_gpu.py (rows with strategy, gpus, compression,
step_ms), simulates each row's plan on the same model, batch and hardware profile, and writes
a table of measured vs predicted step time with the error and the step's floor. Runs on CPU:

    python benchmarks/train_model_check.py benchmarks/results/train_h200_20261130.json --hardware h200
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

from masep.config import preset
from masep.perf.hardware import load_hardware
from masep.perf.traincost import TrainWorkload
from masep.perf.trainsim import simulate_train
from masep.plan import SeparatedPlan, TpPpPlan

# Older row labels of train_gpu.py -> plans; newer rows are in the plan notation. The plain
# PyTorch loop is left out: it keeps no fp32 masters, so its optimizer is not the one modelled.
PLANS = {"separated 1+1 m1": SeparatedPlan(1, 1, 1, 1), "separated 1+1 m2": SeparatedPlan(1, 1, 1, 2),
         "tp2": TpPpPlan(2, 1, 1)}


def plan_of(label: str):
    from masep.plan import parse_plan
    if label.startswith("plain"):
        return None
    if label in PLANS:
        return PLANS[label]
    try:
        return parse_plan(label)
    except ValueError:
        return None


def check(path: Path, hardware: str) -> tuple[list[dict], dict]:
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    cfg = dataclasses.replace(preset(meta["preset"]), num_layers=meta["layers"], dtype="bfloat16")
    hw = load_hardware(hardware)
    rows = []
    for r in doc["rows"]:
        plan = plan_of(r["strategy"])
        if plan is None or "error" in r:
            continue
        work = TrainWorkload(meta["batch"], meta["seq_len"], r.get("compression", "none"))
        sim = simulate_train(plan, cfg, work, hw, check_fit=False)
        rows.append(dict(strategy=r["strategy"], gpus=r["gpus"], compression=work.compression,
                         measured_step_ms=r["step_ms"], predicted_step_ms=sim.step_s * 1e3,
                         floor_ms=sim.floor_s * 1e3, measured_over_predicted=r["step_ms"] / (sim.step_s * 1e3),
                         measured_tokens_per_s=r["tokens_per_s"], predicted_tokens_per_s=sim.tokens_per_s))
    out_meta = dict(source=str(path), hardware_profile=hw.name, model=meta["model"], batch=meta["batch"],
                    seq_len=meta["seq_len"], measured_on=meta["hardware"], date=str(datetime.date.today()))
    return rows, out_meta


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Training step, measured ({meta['measured_on']}, {meta['source']}) vs the simulator "
             f"(profile {meta['hardware_profile']}, uncalibrated): {meta['model']}, {meta['batch']} sequences of "
             f"{meta['seq_len']} tokens, bf16.", "",
             "| run | GPUs | measured step (ms) | predicted step (ms) | floor (ms) | measured / predicted |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = r["strategy"] + (f", {r['compression']}" if r["compression"] != "none" else "")
        lines.append(f"| {label} | {r['gpus']} | {r['measured_step_ms']:.1f} | {r['predicted_step_ms']:.1f} | "
                     f"{r['floor_ms']:.1f} | {r['measured_over_predicted']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="JSON written by benchmarks/train_gpu.py")
    p.add_argument("--hardware", default="h200", help="hardware profile the rows ran on")
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    rows, meta = check(args.results, args.hardware)
    text = markdown(rows, meta)
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
