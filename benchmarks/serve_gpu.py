"""`masep serve` under load on one GPU, beside the static-batch decode step at the same batch.

    python benchmarks/serve_gpu.py --out DIR [--preset paper] [--rates 4 16 64 inf]

1. Starts `masep serve` (strategy single, CUDA graphs per batch bucket, Triton experts) on
   127.0.0.1 and waits for /health.
2. Runs `masep bench serve` once to warm up, then once per request rate (Poisson arrivals,
   random token-id prompts, fixed input and output lengths, ignore_eos so every request
   generates exactly --output-len tokens). Each run reads the server's step counters from
   /metrics: the mean decode batch and the mean host time of a decode step.
3. Stops the server (it holds the GPU's memory) and times the static-batch decode step
   (masep.perf.bench.bench_decode: CUDA events, the same Triton expert kernels) at each run's
   mean decode batch and mean decode context, with its bytes/bandwidth floor.

Writes DIR/serve_<hw>_<yyyymmdd>.json (meta + rows) and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from masep.perf import bench
from masep.serve.loadgen import BenchServeConfig, format_table, print_errors, run_benchmark


def log(msg: str) -> None:
    print(msg, flush=True)


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "fastapi", "uvicorn"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def start_server(args, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "masep", "serve", "--preset", args.preset, "--device", args.device,
           "--port", str(args.port), "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "info"]
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"masep serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"masep serve not healthy after {args.start_timeout} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_config(args, rate: float, num_prompts: int) -> BenchServeConfig:
    return BenchServeConfig(base_url=f"http://127.0.0.1:{args.port}", num_prompts=num_prompts, request_rate=rate,
                            random_input_len=args.input_len, random_output_len=args.output_len,
                            random_vocab_size=args.vocab, ignore_eos=True, seed=args.seed,
                            max_duration=args.max_duration, disable_tqdm=True)


def serve_rows(args) -> list[dict]:
    proc = start_server(args, args.out / "serve_server.log")
    rows = []
    try:
        log("warm-up run (not recorded)")
        asyncio.run(run_benchmark(bench_config(args, math.inf, min(args.num_prompts, args.max_num_seqs))))
        for rate in args.rates:
            result = asyncio.run(run_benchmark(bench_config(args, rate, args.num_prompts)))
            log(format_table(result))
            if result["failed"]:
                print_errors(result)
            keep = {k: v for k, v in result.items() if k not in ("input_lens", "output_lens", "ttfts", "itls", "errors")}
            keep["errors_first"] = [e for e in result["errors"] if e][:5]
            rows.append({"kind": "serve", "request_rate": keep.pop("request_rate"), **keep})
    finally:
        stop_server(proc)
    return rows


def static_rows(args, serve: list[dict]) -> list[dict]:
    """The static-batch decode step at each run's mean decode batch (rounded) and mean context
    of a decode step (prompt + half the output), same kernels, CUDA-event timed."""
    copy_bw = bench.measure_copy_bandwidth()
    rows = []
    context = args.input_len + args.output_len // 2
    for batch in sorted({max(1, round(r["server"]["mean_decode_rows"])) for r in serve if r.get("server")}):
        row = bench.bench_decode(args.preset, batch, context, impl="triton", copy_bw=copy_bw, log=log)
        rows.append({"kind": "static", **row})
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    static = {r["batch"]: r for r in rows if r["kind"] == "static"}
    lines = [f"# `masep serve` on one {meta['device']} ({meta['date']})", "",
             f"Preset `{meta['preset']}` (bf16, random weights), strategy single, CUDA graphs per batch bucket "
             f"captured at start-up, Triton experts. Prompts of {meta['input_len']} random token ids, "
             f"{meta['output_len']} output tokens each (ignore_eos), {meta['num_prompts']} requests per rate, "
             f"Poisson arrivals; `--max-num-seqs {meta['max_num_seqs']}`, `--max-model-len {meta['max_model_len']}`. "
             f"Versions: torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}, Python {meta['python']}.",
             "", "Static = one decode step of a static batch of the same size at the mean decode context "
             f"({meta['input_len'] + meta['output_len'] // 2} keys), timed by CUDA events; its floor is the bytes the "
             "step must read over the copy bandwidth measured in the same run. Server decode step = host time around "
             "the engine's decode step (scheduling, sampling and the host sync included).", "",
             "| rate (req/s) | done / failed | req/s done | output tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | p99 TPOT ms "
             "| mean ITL ms | mean decode batch | server decode step ms | static TPOT ms (batch) | static floor ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "serve":
            continue
        srv = r.get("server", {})
        b = max(1, round(srv.get("mean_decode_rows", 0)))
        st = static.get(b)
        static_cells = f"{st['tpot_ms_median']:.2f} ({b}) | {st['floor_ms']:.2f}" if st else "- | -"
        lines.append(f"| {r['request_rate']} | {r['completed']} / {r['failed']} | {r['request_throughput']:.2f} | {r['output_throughput']:.0f} | "
                     f"{r['mean_ttft_ms']:.1f} | {r['p99_ttft_ms']:.1f} | {r['mean_tpot_ms']:.2f} | "
                     f"{r['p99_tpot_ms']:.2f} | {r['mean_itl_ms']:.2f} | {srv.get('mean_decode_rows', 0):.1f} | "
                     f"{srv.get('mean_decode_step_ms', 0):.2f} | {static_cells} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the serving part (no static rows)")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0, math.inf])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-duration", type=float, default=120.0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    meta = {**versions(), **bench.device_meta(), "preset": args.preset, "input_len": args.input_len,
            "output_len": args.output_len, "num_prompts": args.num_prompts, "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len, "rates": [str(r) for r in args.rates]}
    log(json.dumps(meta))
    rows = serve_rows(args)
    if args.device == "cuda":
        rows += static_rows(args, rows)
    tag = f"{bench.hardware_tag(meta['device'])}_{meta['date'].replace('-', '')}"
    (args.out / f"serve_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    md = markdown(meta, rows)
    (args.out / f"serve_{tag}.md").write_text(md)
    log(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
