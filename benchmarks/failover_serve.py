"""Failover of a running `masep serve` under `masep bench serve`: lost requests, tokens, stall.

    python benchmarks/failover_serve.py --out DIR [--device cpu|cuda] [--preset tiny] [--dtype float32]
        [--num-prompts 24] [--output-len 48] [--tag T]

The plan: separated, two attention replicas and two expert ranks that each hold every expert
(`--attn-replicas 2 --expert-ranks 2 --placement "0,...,N-1;0,...,N-1"`), so 4 ranks: gloo on
CPU, one GPU each (NCCL) with --device cuda. Each scenario starts a fresh server
(`python -m masep serve ... --timeout 5`, or --serve-timeout; a free port on 127.0.0.1), waits for /health, then
runs `masep bench serve --save-detailed --json` (greedy, --ignore-eos, fixed seed, input and
output lengths, fixed arrivals spread over about 2 s) as a subprocess:
  no-fault            the reference tokens and baseline timings;
  kill-attention      SIGKILL attention replica 1's rank mid-decode (its requests move to
                      replica 0, which recomputes their KV: --protection recompute);
  kill-expert         SIGKILL expert rank 3 mid-decode (expert rank 2 holds every expert:
                      routed around);
  kill-attention-mirror  as kill-attention with --protection mirror (replica 0 already holds
                      replica 1's KV rows).
The kill comes --kill-after s (default 1) after the server's first generated token (polled
from /metrics), with the rank's pid from GET /health's "ranks". Measured per scenario:
  completed / failed / unsent of the requests sent (no request may be lost);
  identical: completed requests whose token ids equal the no-fault run's, request by request;
  kill->health: from os.kill to /health naming the unit / expert rank lost (polled every 50 ms);
  max ITL: the longest gap between two output chunks of any request (the client's stall),
  beside the no-fault run's; output tok/s; /health after the run (status, lost units and
  expert ranks with their reasons, live units).
Writes DIR/failover_serve_<hosttag>[_<tag>]_<yyyymmdd>.json (meta + rows) and .md, and prints
the markdown. Exit status 0 only if every scenario ran its fault while requests were running,
lost no request, and every completed request's tokens equal the no-fault run's.

Never hangs: every HTTP call and subprocess wait has a timeout; each server runs in its own
process group, is SIGTERMed and then killed (with any rank left) before the next one starts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from masep.config import preset

HEALTH_POLL_S = 0.05
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Scenario:
    name: str
    protection: str
    fault: str | None  # None | "attention" | "expert"


SCENARIOS = {s.name: s for s in (Scenario("no-fault", "recompute", None),
                                  Scenario("kill-attention", "recompute", "attention"),
                                  Scenario("kill-expert", "recompute", "expert"),
                                  Scenario("kill-attention-mirror", "mirror", "attention"))}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- HTTP --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_health(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    """(HTTP status, JSON body) of GET /health; (0, {}) when it does not answer."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}
    except (OSError, ValueError):
        return 0, {}


def get_metrics(url: str, timeout: float = 2.0) -> dict[str, float]:
    """{'generation_tokens': ..., 'running': ...} from GET /metrics; {} when it does not answer."""
    names = {"vllm:generation_tokens_total": "generation_tokens", "vllm:num_requests_running": "running"}
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[names[name]] = out.get(names[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# --- the server --------------------------------------------------------------------------------
def placement(num_experts: int) -> str:
    every = ",".join(str(e) for e in range(num_experts))
    return f"{every};{every}"


def serve_args(args, protection: str) -> list[str]:
    cmd = ["--preset", args.preset, "--device", args.device, "--strategy", "separated", "--attn-replicas", "2",
           "--expert-ranks", "2", "--placement", placement(preset(args.preset).num_experts),
           "--protection", protection, "--timeout", str(args.serve_timeout), "--seed", str(args.seed), "--log-level", "warning"]
    return cmd + (["--dtype", args.dtype] if args.dtype else [])


def start_server(args, protection: str, log_file) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cuda":
        env.update(NO_MULTICAST)
    cmd = [sys.executable, "-m", "masep", "serve", *serve_args(args, protection), "--host", "127.0.0.1",
           "--port", str(port)]
    log("$ " + shlex.join(cmd))
    # Its own process group: the ranks are its children, and one killpg at the end takes what is left.
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"masep serve exited with {proc.returncode} before /health answered")
        status, health = get_health(url)
        if status == 200 and health.get("status") == "ok":
            return health
        time.sleep(0.25)
    raise RuntimeError(f"masep serve: /health not ok within --start-timeout {timeout_s:g} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL the server's process group (its ranks with it)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"masep serve (pid {proc.pid}) still running {timeout_s:g} s after SIGTERM: SIGKILL")
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group proc leads: whatever of it is left
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log(f"masep serve (pid {proc.pid}) did not exit after SIGKILL")


# --- the load ----------------------------------------------------------------------------------
def bench_cmd(args, url: str) -> list[str]:
    rate = args.request_rate or args.num_prompts / 2.0
    return [sys.executable, "-m", "masep", "bench", "serve", "--base-url", url, "--num-prompts", str(args.num_prompts),
            "--request-rate", f"{rate:g}", "--arrival", "fixed", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-vocab-size", str(preset(args.preset).vocab_size),
            "--seed", str(args.seed), "--temperature", "0", "--ignore-eos", "--max-duration", f"{args.max_duration:g}",
            "--request-timeout", f"{args.max_duration:g}", "--save-detailed", "--json", "--disable-tqdm",
            "--log-level", "warning"]


class Fault(threading.Thread):
    """Waits for the first generated token, then --kill-after s, SIGKILLs `target` (a /health
    rank) while the load runs, and polls /health every 50 ms until it names the loss."""

    def __init__(self, url: str, target: dict, kill_after: float, done: threading.Event, give_up_s: float):
        super().__init__(daemon=True)
        self.url, self.target, self.kill_after, self.done, self.give_up_s = url, target, kill_after, done, give_up_s
        self.info: dict = {"killed": False}

    def lost(self, health: dict) -> bool:
        if self.target["role"] == "attention":
            return str(self.target["unit"]) in (health.get("lost_units") or {})
        return str(self.target["rank"]) in (health.get("lost_expert_ranks") or {})

    def run(self) -> None:
        info, deadline = self.info, time.monotonic() + self.give_up_s
        while not (m := get_metrics(self.url)).get("generation_tokens"):
            if self.done.is_set() or time.monotonic() > deadline:
                info["why_no_kill"] = "no generated token seen on /metrics before the load ended"
                return
            time.sleep(HEALTH_POLL_S)
        first = time.monotonic()
        if self.done.wait(self.kill_after):
            info["why_no_kill"] = (f"the load ended {time.monotonic() - first:.2f} s after the first token, "
                                   f"before --kill-after {self.kill_after:g} s")
            return
        m = get_metrics(self.url)
        info.update(running_at_kill=int(m.get("running", -1)), tokens_at_kill=int(m.get("generation_tokens", -1)))
        try:
            os.kill(self.target["pid"], signal.SIGKILL)
        except ProcessLookupError:  # the rank was gone already: the server lost or restarted it by itself
            info["why_no_kill"] = f"pid {self.target['pid']} was gone before the kill (see /health)"
            return
        killed = time.monotonic()
        info.update(killed=True, since_first_token_s=round(killed - first, 3))
        while time.monotonic() < killed + 60:
            status, health = get_health(self.url)
            if self.lost(health):
                info["kill_to_health_ms"] = round((time.monotonic() - killed) * 1e3, 1)
                return
            time.sleep(HEALTH_POLL_S)
        info["kill_to_health_ms"] = None


def pick_target(ranks: list[dict], fault: str) -> dict:
    if fault == "attention":
        return next(r for r in ranks if r["role"] == "attention" and r["unit"] == 1)
    return max((r for r in ranks if r["role"] == "expert"), key=lambda r: r["rank"])


def verdict(status: int, health: dict, width: int | None = None) -> str:
    """/health in one line; `width` cuts each reason (the table's cell), the JSON keeps them whole."""
    if not health:
        return f"no answer (HTTP {status})" if status else "no answer"
    def cut(why: str) -> str:  # at the last ")" or space within width
        if width is None or len(why) <= width:
            return why
        head = why[:width]
        end = head.rfind(")") + 1 or head.rfind(" ") + 1 or width
        return head[:end].rstrip() + "…"
    parts = [f"{status} {health.get('status')}"]
    parts += [f"lost unit {u}: {cut(why)}" for u, why in (health.get("lost_units") or {}).items()]
    parts += [f"lost expert rank {r}: {cut(why)}" for r, why in (health.get("lost_expert_ranks") or {}).items()]
    parts.append(f"live units {health.get('live_units')}")
    return "; ".join(parts)


def run_scenario(args, sc: Scenario, logdir: Path) -> dict:
    row: dict = dict(scenario=sc.name, protection=sc.protection, fault=sc.fault, sent=args.num_prompts)
    log_path = logdir / f"{sc.name}.log"
    bench = None
    with log_path.open("w") as log_file:
        proc, url = start_server(args, sc.protection, log_file)
        try:
            t0 = time.monotonic()
            health = wait_healthy(proc, url, args.start_timeout)
            row["start_s"] = round(time.monotonic() - t0, 2)
            if sc.fault:
                target = pick_target(health["ranks"], sc.fault)
                row["target"] = {k: target[k] for k in ("rank", "role", "unit", "pid")}
            cmd = bench_cmd(args, url)
            log("$ " + shlex.join(cmd))
            bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True)
            done = threading.Event()
            fault = Fault(url, target, args.kill_after, done, args.max_duration) if sc.fault else None
            if fault:
                fault.start()
            try:
                out, err = bench.communicate(timeout=args.max_duration + 60)
            finally:
                done.set()
            if fault:
                fault.join(timeout=70)
                row.update(fault.info)
            if bench.returncode not in (0, 1) or not out.strip():
                raise RuntimeError(f"masep bench serve exited with {bench.returncode}: {err.strip()[-1500:]}")
            result = json.loads(out)["rows"][0]
            status, health = get_health(url, timeout=5)
            row.update(completed=result["completed"], failed=result["failed"], unsent=result["unsent"],
                       output_throughput=result["output_throughput"], duration_s=result["duration"],
                       max_itl_ms=max((g for gaps in result["itls"] for g in gaps), default=0.0) * 1e3,
                       mean_itl_ms=result.get("mean_itl_ms"), p99_itl_ms=result.get("p99_itl_ms"),
                       errors=[e for e in result["errors"] if e][:5],
                       health_status=status, health={k: health.get(k) for k in (
                           "status", "live_units", "lost_units", "lost_expert_ranks", "restarts", "joins")},
                       verdict=verdict(status, health))
            row["_token_ids"], row["_errors"] = result["generated_token_ids"], result["errors"]
        except Exception as e:  # noqa: BLE001 - one scenario's failure is its row, the others still run
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"{sc.name}: {row['error']}")
        finally:
            if bench is not None and bench.poll() is None:
                bench.kill()
                bench.wait(timeout=10)
            stop_server(proc)
    if "error" in row or row.get("failed") or (sc.fault and not row.get("killed")):
        text = log_path.read_text(errors="replace")
        row["server_log_tail"] = text[-3000:]
        keep = args.out / f"{args.stem}_logs"  # the whole log: the first error is rarely in the tail
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{sc.name}.log").write_text(text)
        row["server_log"] = str(keep / f"{sc.name}.log")
    return row


def compare(rows: list[dict], ref: dict | None) -> None:
    """identical / mismatched per row against the no-fault row's tokens; the no-fault baselines;
    ok: every request completed, every one identical, and (fault rows) the kill hit running requests."""
    ref_ids = ref.get("_token_ids") if ref else None
    for row in rows:
        ids, errors = row.pop("_token_ids", None), row.pop("_errors", None)
        if ids is not None and ref_ids is not None:
            done = [i for i, e in enumerate(errors) if not e]
            row["mismatched"] = [i for i in done if i >= len(ref_ids) or ids[i] != ref_ids[i]]
            row["identical"] = len(done) - len(row["mismatched"])
        if ref and "error" not in ref:
            row["baseline_max_itl_ms"] = ref.get("max_itl_ms")
            row["baseline_output_throughput"] = ref.get("output_throughput")
        row["ok"] = ("error" not in row and row.get("completed") == row["sent"] and row.get("failed") == 0
                     and row.get("unsent") == 0 and row.get("identical") == row.get("completed")
                     and (not row["fault"] or (row.get("killed", False) and row.get("running_at_kill", 0) > 0)))


# --- output ------------------------------------------------------------------------------------
def hardware(device: str, timeout_s: float = 60) -> dict:
    """torch version and the GPUs, asked in a child process: this one keeps no CUDA context."""
    code = ("import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu_count': n, "
            "'gpu': torch.cuda.get_device_name(0) if n else None}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                             env=dict(os.environ, **(NO_MULTICAST if device == "cuda" else {})))
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        info = {"torch": None, "gpu_count": 0, "gpu": None, "error": str(e)}
    info["device"] = f"{info['gpu_count']} x {info['gpu']}" if device == "cuda" and info.get("gpu") else "cpu"
    info["cpu_count"] = os.cpu_count()
    return info


def host_tag(device: str, hw: dict) -> str:
    if device != "cuda" or not hw.get("gpu"):
        return "cpu"
    from masep.perf.bench import hardware_tag
    return f"{hardware_tag(hw['gpu'])}x{hw['gpu_count']}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    plan = meta["plan"]
    lines = [f"# `masep serve` failover on {meta['hardware']['device']} ({meta['date']})", "",
             f"Preset `{meta['preset']}` ({meta['dtype'] or 'its dtype'}), device {meta['device_kind']}, plan "
             f"`{plan['notation']}`: `{plan['flags']}` ({plan['ranks']} ranks). Load: `masep bench serve`, "
             f"{meta['num_prompts']} requests of {meta['input_len']} random token ids, {meta['output_len']} output "
             f"tokens each (greedy, ignore_eos), fixed arrivals at {meta['request_rate']:g} req/s. Each fault: "
             f"SIGKILL {meta['kill_after']:g} s after the server's first generated token. torch {meta['hardware']['torch']}.",
             "", "| scenario | protection | completed / sent | failed | identical / completed | kill→health ms "
             "| max ITL ms (no-fault) | tok/s (no-fault) | /health verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scenario']} | {r['protection']} | - | - | - | - | - | - | error: {r['error'][:120]} |")
            continue
        name = r["scenario"] + (f" (rank {r['target']['rank']})" if r.get("target") else "")
        if r["fault"] and not r.get("killed"):
            name += f" — not killed: {r.get('why_no_kill')}"
        identical = f"{r['identical']} / {r['completed']}" if "identical" in r else "-"
        kill = _ms(r.get("kill_to_health_ms")) if r["fault"] else "-"
        lines.append(f"| {name} | {r['protection']} | {r['completed']} / {r['sent']} | {r['failed']} | {identical} | "
                     f"{kill} | {_ms(r['max_itl_ms'])} ({_ms(r.get('baseline_max_itl_ms'))}) | "
                     f"{r['output_throughput']:.0f} ({r.get('baseline_output_throughput') or 0:.0f}) | "
                     f"{verdict(r['health_status'], r['health'], 80).replace('|', '/')} |")
    bad = [r["scenario"] for r in rows if not r["ok"]]
    lines += ["", "All scenarios: no request lost, tokens identical to the no-fault run." if not bad
              else f"NOT OK: {', '.join(bad)} (see the JSON rows)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32", help="passed to serve ('' : the preset's)")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--request-rate", type=float, default=None, help="fixed arrivals, req/s (default: num-prompts / 2 s)")
    p.add_argument("--kill-after", type=float, default=1.0, help="seconds after the first generated token")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (no-fault always runs first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration", type=float, default=120.0, help="bench serve --max-duration, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server's /health to answer ok")
    p.add_argument("--serve-timeout", type=float, default=5.0,
                   help="serve --timeout: seconds a rank may wait for a peer (a model whose first steps compile "
                        "kernels needs more; a SIGKILL is noticed at once either way)")
    p.add_argument("--tag", default="", help="added to the file names")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    names = ["no-fault"] + [n for n in names if n != "no-fault"]
    longest = preset(args.preset).max_seq_len
    if args.input_len + args.output_len > longest:  # the server would refuse every request
        p.error(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds {args.preset}'s "
                f"max_seq_len {longest}")
    # SIGTERM ends the script through the finally blocks (servers stopped), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    hw = hardware(args.device)
    date = datetime.date.today().strftime("%Y%m%d")
    stem = f"failover_serve_{host_tag(args.device, hw)}{'_' + args.tag if args.tag else ''}_{date}"
    args.stem = stem
    flags = shlex.join(serve_args(args, "recompute")[:12])
    meta = dict(hardware=hw, torch=hw.get("torch"), date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["failover_serve.py", *argv]),
                device_kind=args.device, preset=args.preset, dtype=args.dtype or None, num_prompts=args.num_prompts,
                input_len=args.input_len, output_len=args.output_len,
                request_rate=args.request_rate or args.num_prompts / 2.0, kill_after=args.kill_after, seed=args.seed,
                plan=dict(notation="sep 2x1+2", strategy="separated", attn_replicas=2, attn_tp=1, expert_ranks=2,
                          placement=placement(preset(args.preset).num_experts), ranks=4, flags=flags,
                          serve_timeout_s=args.serve_timeout),
                scenarios=names)
    rows = []
    with tempfile.TemporaryDirectory(prefix="failover_serve_") as tmp:
        for name in names:
            log(f"--- {name}")
            rows.append(run_scenario(args, SCENARIOS[name], Path(tmp)))
            log(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_") and k != "server_log_tail"}))
    compare(rows, rows[0])
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
