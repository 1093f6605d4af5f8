"""`masep run` across strategies: same prompts, same greedy tokens, comparable JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMON = ["run", "--preset", "tiny", "--batch", "3", "--prompt-len", "6", "--max-new-tokens", "3",
          "--seed", "5", "--warmup", "0", "--json"]
STRATEGIES = {
    "single": [],
    "separated": ["--attn-replicas", "1", "--attn-tp", "2", "--expert-ranks", "1", "--microbatches", "2"],
    "tp_pp": ["--tp", "2", "--pp", "2"],
    "ep": ["--ep", "2"],
}


def _masep(*args, check=True):
    return subprocess.run([sys.executable, "-m", "masep", *args], capture_output=True, text=True, timeout=240,
                          check=check)


@pytest.mark.timeout(600)
def test_strategies_give_identical_tokens_on_the_same_prompts(tmp_path):
    reports = {}
    for name, flags in STRATEGIES.items():
        extra = ["--trace", str(tmp_path / name)] if name == "separated" else []
        out = _masep(*COMMON, "--strategy", name, *flags, *extra)
        doc = json.loads(out.stdout)
        reports[name] = {**doc["meta"], **doc["rows"][0]}  # the plan and config in meta, results in the row
    single = reports["single"]
    for name, rep in reports.items():
        assert rep["prompts"] == single["prompts"], name
        assert rep["tokens"] == single["tokens"], f"{name}: greedy tokens differ from single"
        for key in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput", "config"):
            assert key in rep, f"{name}: --json lacks {key}"
    for name, world in (("separated", 3), ("tp_pp", 4), ("ep", 2)):
        rep = reports[name]
        assert rep["plan"]["strategy"] == name
        assert {row["rank"] for row in rep["busy"]} == set(range(world))
    assert sum(map(sum, reports["separated"]["expert_load"])) == 2 * 3 * (6 + 2) * 2  # layers*batch*tokens*top-k
    traces = sorted(p.name for p in (tmp_path / "separated").iterdir())
    assert traces == ["rank0.json", "rank1.json", "rank2.json"]
    assert "dispatch(l0,mb0)" in (tmp_path / "separated" / "rank0.json").read_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags,message", [
    (["--strategy", "separated", "--attn-tp", "9"], r"plan.attn_tp=9: more head-parallel ranks than attention heads"),
    (["--strategy", "separated", "--microbatches", "0"], r"plan.microbatches=0"),
    (["--strategy", "tp_pp", "--pp", "3"], r"plan.pp=3: more pipeline stages than layers"),
    (["--strategy", "ep", "--ep", "9"], r"plan.ep=9: more ranks than experts"),
    (["--strategy", "separated", "--placement", "0,1;x"], r"--placement='0,1;x'"),
    (["--strategy", "separated", "--expert-ranks", "2", "--placement", "0,1,2;3"], r"placed on no rank"),
])
def test_bad_distributed_arguments_exit_2_before_any_rank_starts(flags, message):
    import re
    out = _masep("run", "--preset", "tiny", *flags, check=False)
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flags", [["--strategy", "separated", "--attn-tp", "2", "--expert-ranks", "1"],
                                   ["--strategy", "tp_pp", "--tp", "1", "--pp", "2"],
                                   ["--strategy", "ep", "--ep", "2"]], ids=["separated", "tp_pp", "ep"])
def test_bench_dist_reports_one_row_per_plan(flags):
    out = _masep("bench", "dist", "--preset", "tiny", *flags, "--batch", "5", "--context", "16", "--steps", "3",
                 "--warmup-steps", "1", "--json")
    doc = json.loads(out.stdout)
    assert doc["meta"]["command"] == "bench dist" and doc["meta"]["plan"]["strategy"] == flags[1]
    row, = doc["rows"]
    for key in ("device", "torch", "date", "strategy", "plan", "preset", "batch", "context", "duration",
                "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "output_throughput", "busy_ms_per_step"):
        assert key in row, key
    assert row["batch"] == 5 and row["context"] == 16 and row["strategy"] == flags[1]
    assert row["p99_tpot_ms"] >= row["median_tpot_ms"] > 0
    assert row["output_throughput"] == pytest.approx(5 * 3 / row["duration"])


@pytest.mark.timeout(240)
def test_the_same_entry_point_runs_under_torchrun():
    """torchrun sets RANK/WORLD_SIZE/MASTER_*: `masep run` joins that world instead of spawning,
    rank 0 prints, and a plan that does not match the launch is refused before any work."""
    args = [*COMMON, "--strategy", "separated", "--attn-tp", "2", "--expert-ranks", "1"]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--standalone", "-m", "masep"]
    out = subprocess.run([*run, *args], capture_output=True, text=True, timeout=200, check=True)
    rep = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))["rows"][0]
    single = json.loads(_masep(*COMMON, "--strategy", "single").stdout)["rows"][0]
    assert rep["tokens"] == single["tokens"]
    bad = subprocess.run([*run[:4], "2", *run[5:], *args], capture_output=True, text=True, timeout=200)
    assert bad.returncode != 0 and "plan.world_size=2: the launch has 2 ranks but the plan needs 3" in bad.stderr
