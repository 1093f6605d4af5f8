"""Every command's --json is one document of one shape, {"meta": {...}, "rows": [...]}, with the
metric names of `vllm bench serve` where a row measures what they measure; --log-level and the
rank tag of log lines. In-process and on tiny inputs: where a command would start ranks, train or
need a GPU, the launch is replaced by a result of the real shape, so only the documents are tested
here (the launches have their own tests)."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from masep.cli import main
from masep.report import document

META = {"command", "date", "versions", "args"}
VLLM_NAMES = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
              "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
              "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms")


def _doc(capsys, argv: list[str], code: int = 0) -> dict:
    assert main(argv) == code
    doc = json.loads(capsys.readouterr().out)  # stdout holds the document and nothing else
    assert set(doc) == {"meta", "rows"} and META <= set(doc["meta"]), sorted(doc)
    assert isinstance(doc["rows"], list) and all(isinstance(r, dict) for r in doc["rows"])
    assert doc["meta"]["versions"]["torch"] == torch.__version__
    return doc


@pytest.mark.timeout(60)
def test_run_plan_simulate_sweep_replan_calcheck(capsys, tmp_path):
    run = _doc(capsys, ["run", "--preset", "tiny", "--batch", "2", "--prompt-len", "4", "--max-new-tokens", "3",
                        "--warmup", "0", "--json"])
    assert run["meta"]["command"] == "run" and run["meta"]["model"]["name"] == "tiny"
    assert run["meta"]["hardware"]["device"] == "cpu" and run["meta"]["args"]["batch"] == 2
    assert run["meta"]["plan_notation"] == "single"
    row, = run["rows"]
    assert all(name in row for name in VLLM_NAMES) and "duration_s" not in row and row["completed"] == 2

    plan = _doc(capsys, ["plan", "--preset", "tiny", "--gpus", "2", "--batch", "4", "--context", "64", "--top", "2",
                         "--json"])
    assert plan["meta"]["hardware"]["gpus"] == 2 and plan["rows"][0]["tpot_ms"] > 0
    train_plan = _doc(capsys, ["plan", "--train", "--preset", "tiny", "--gpus", "2", "--batch", "4", "--seq-len", "32",
                               "--json"])
    assert train_plan["meta"]["command"] == "plan --train" and train_plan["rows"][0]["tokens_per_s"] > 0
    sim = _doc(capsys, ["simulate", "--preset", "tiny", "--gpus", "2", "--batch", "4", "--context", "64", "--json"])
    assert sim["rows"][-1]["label"] == "planner's best"
    sweep = _doc(capsys, ["sweep", "--preset", "tiny", "--gpus", "2", "--batches", "2", "--contexts", "64",
                          "--strategies", "ep", "--max-microbatches", "1", "--out", str(tmp_path / "sweep"), "--json"])
    assert [(r["axis"], r.get("batch"), r.get("context")) for r in sweep["rows"]] == [("batch", 2, 2048),
                                                                                      ("context", 24, 64)]
    assert sweep["meta"]["files"][0].endswith("sweep.json")

    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(dict(plan="ep2 m1", preset="tiny", hardware="h100", batch=4, context=64, steps=1,
                                        busy_s={"0": {"attention": 1e-4}, "1": {"attention": 1e-4}},
                                        timing="cuda_events")))
    replan = _doc(capsys, ["replan", "--measured", str(measured), "--json"])
    assert replan["rows"][0]["plan"] == "ep2 m1" and replan["meta"]["hardware"]["profile"] == "h100"
    cal = _doc(capsys, ["calcheck", "benchmarks/results/calibration_h200_20261127.json", "--hardware", "h200",
                        "--json"])
    assert cal["rows"][0]["measured_ms"] > 0 and "attention" in cal["meta"]["summary"]


@pytest.mark.timeout(60)
def test_bench_dist_and_train_documents_without_ranks(capsys, monkeypatch, tmp_path):
    from masep.config import preset
    from masep.parallel import bench_dist

    def fake_bench(spec):  # bench_dist.summarize over made-up per-rank step times
        env = SimpleNamespace(device=torch.device("cpu"), backend="gloo", world_size=2)
        reports = [dict(rank=r, times_s=[0.01, 0.02, 0.03], busy_s={"attention": 0.01}, max_memory_bytes=None,
                        timing="host_clock", energy={"unavailable": "no NVML energy counter on cpu"})
                   for r in range(2)]
        return bench_dist.summarize(spec, spec.run.plan, preset("tiny"), env, reports)

    monkeypatch.setattr(bench_dist, "launch_bench", fake_bench)
    dist = _doc(capsys, ["bench", "dist", "--preset", "tiny", "--plan", "ep2 m2", "--batch", "4", "--context", "8",
                         "--steps", "3", "--json"])
    row, = dist["rows"]
    assert dist["meta"]["plan_notation"] == "ep2 m2" and dist["meta"]["hardware"]["world_size"] == 2
    assert row["median_tpot_ms"] == pytest.approx(20.0) and row["duration"] == pytest.approx(0.06)
    assert row["output_throughput"] == pytest.approx(4 * 3 / 0.06) and "tps" not in row
    assert row["timing"] == "host_clock" and row["joules_per_token"] is None and "cpu" in row["energy_unavailable"]

    from masep.train import cli as train_cli, trainer
    monkeypatch.setattr(train_cli, "_corpus", lambda *a: (torch.zeros(8, 17, dtype=torch.long), None))
    steps = [dict(step=i, loss=1.0, tokens_per_s=10.0) for i in (1, 2)]
    monkeypatch.setattr(trainer, "launch_training", lambda spec: dict(history=steps, memory={}, skipped_steps=0,
                                                                      plan="single", grad_sync={}))
    train = _doc(capsys, ["train", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--seq-len", "16",
                          "--batch-size", "2", "--log-dir", str(tmp_path), "--json"])
    assert train["rows"] == steps and train["meta"]["command"] == "train" and train["meta"]["curve"] is None


def test_bench_serve_and_bench_decode_documents(capsys, monkeypatch):
    from masep.metrics import RequestOutput
    from masep.serve.loadgen import BenchServeConfig, result_document, summarize
    outputs = [RequestOutput(4, [1, 2, 3], token_times_s=[0.1, 0.2, 0.3]) for _ in range(2)]
    doc = result_document(None, summarize(BenchServeConfig(), "m", outputs, 1.0))
    assert set(doc) == {"meta", "rows"} and doc["meta"]["model"] == {"name": "m"}
    assert all(name in doc["rows"][0] for name in VLLM_NAMES)

    from masep.perf import bench
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "device_meta", lambda *a: dict(device="a GPU", torch=torch.__version__, date="d"))

    def fake_sweep(presets, batches, context, impls, *, on_row, **kw):
        rows = [dict(preset=p, batch=b, impl=i) for p in presets for i in impls for b in batches]
        for r in rows:
            on_row(r)
        return rows

    monkeypatch.setattr(bench, "decode_sweep", fake_sweep)
    assert bench.main(["decode", "--preset", "tiny", "--batch", "1", "2", "--impl", "grouped_mm"]) == 0
    dec = json.loads(capsys.readouterr().out)
    assert set(dec) == {"meta", "rows"} and len(dec["rows"]) == 2 and dec["meta"]["hardware"]["device"] == "a GPU"


def test_document_shape_and_log_tags(capsys, monkeypatch):
    doc = document("x", [{"a": 1}], {"rate": float("inf"), "handler": print, "items": (1, 2)}, model="m")
    assert doc["meta"]["args"] == {"rate": "inf", "items": [1, 2]} and doc["meta"]["model"] == {"name": "m"}
    from masep.logs import setup_logging
    monkeypatch.delenv("RANK", raising=False)
    setup_logging("warning")
    logging.getLogger("masep.test").info("hidden")
    logging.getLogger("masep.test").warning("shown")
    monkeypatch.setenv("RANK", "3")
    logging.getLogger("masep.test").warning("from a rank")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[front] WARNING shown" in err and "[rank 3] WARNING from a rank" in err
    setup_logging("info")
