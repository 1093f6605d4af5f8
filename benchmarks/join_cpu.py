"""Recovery from a dead expert rank whose experts no other rank holds, through `masep serve` on CPU.

    python benchmarks/join_cpu.py --out benchmarks/results [--preset tiny] [--kills 3]

Two servers of the same plan (1 attention rank + 2 expert ranks, gloo): one replaces the dead
rank (a new process for that rank joins the survivors, `--join-timeout 300`), the other starts
every rank again (`--join-timeout 0`, the path before joins existed). For each of `--kills`
kills: a long greedy request is decoding, this script SIGKILLs expert rank 2, then sends one-token
requests back to back (a refused or failed one is sent again 20 ms later) until one is answered.
recovery_s = from the SIGKILL to that answer: the death noticed, the in-flight request failed,
the replacement (or every rank) started and loaded, the first token served.
Writes join_cpu_<yyyymmdd>.json (meta + rows) and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PLAN = ["--strategy", "separated", "--attn-replicas", "1", "--expert-ranks", "2"]


def _post(url: str, prompt: list[int], max_tokens: int) -> int:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def _health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def _start(preset: str, join_timeout: float, port: int) -> tuple[str, subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-m", "masep", "serve", "--preset", preset, *PLAN, "--port", str(port),
                             "--served-model-name", "m", "--max-num-seqs", "4", "--log-level", "warning",
                             "--max-restarts", "10", "--join-timeout", str(join_timeout)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if _health(url).get("status") == "ok":
                return url, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("masep serve did not start")
        time.sleep(0.2)


def _wait_ok(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(url).get("status") != "ok":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come back: {_health(url)}")
        time.sleep(0.2)


def measure(url: str) -> float:
    """Kill expert rank 2 while a request decodes; seconds until a new request is answered."""
    _wait_ok(url)
    pid = next(r["pid"] for r in _health(url)["ranks"] if r["rank"] == 2)
    _post(url, [1, 2, 3], 4)  # warm: the next step runs on every rank
    longer = threading.Thread(target=_post, args=(url, [9, 8, 7], 200))
    longer.start()
    time.sleep(0.3)  # decoding
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while _post(url, [4, 5, 6], 1) != 200:
        time.sleep(0.02)
    recovered = time.monotonic() - killed
    longer.join(120)
    return recovered


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--port", type=int, default=8391)
    args = p.parse_args()
    rows = []
    for name, join_timeout in (("replacement joins the survivors", 300.0), ("every rank restarts", 0.0)):
        url, proc = _start(args.preset, join_timeout, args.port)
        try:
            times = [measure(url) for _ in range(args.kills)]
            health = _health(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        rows.append({"path": name, "join_timeout_s": join_timeout, "recovery_s": times,
                     "median_s": statistics.median(times), "joins": health.get("joins"),
                     "restarts": health.get("restarts")})
        print(f"{name}: recovery {', '.join(f'{t:.2f}' for t in times)} s (median {rows[-1]['median_s']:.2f})",
              flush=True)
    meta = {"preset": args.preset, "plan": " ".join(PLAN), "kills": args.kills, "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"join_cpu_{datetime.date.today():%Y%m%d}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Recovery from a dead expert rank (no redundancy), `masep serve`, {args.preset}, "
             f"{' '.join(PLAN)}, gloo on {os.cpu_count()} CPU cores", "",
             "| path | recovery s (each kill) | median s | joins | restarts |", "|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {', '.join(f'{t:.2f}' for t in r['recovery_s'])} | {r['median_s']:.2f} | "
              f"{r['joins']} | {r['restarts']} |" for r in rows]
    lines += ["", f"recovery = SIGKILL of expert rank 2 while a request decodes -> first answer to a new request; "
              f"load average at the end {meta['load_average_at_end'][0]:.1f} (other work on the machine)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
