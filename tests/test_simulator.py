"""Simulator: a two-rank toy timeline checked op by op, matching of every strategy's transfers,
deadlock detection, metrics, Chrome trace / Gantt output, determinism."""
import json

import pytest

from masep.config import preset
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan
from masep.perf import costmodel as cm
from masep.perf import simulator as sim_mod
from masep.perf.costmodel import Workload
from masep.perf.hardware import get_profile
from masep.perf.simulator import Deadlock, simulate
from masep.perf.trace import chrome_trace, gantt_png, write_trace

from test_costmodel import HW, TOY


def _timeline(sim):
    return {(r.rank, str(r.op)): (r.start, r.end) for r in sim.records}


@pytest.mark.timeout(20)
def test_two_rank_timeline_op_by_op():
    # rank 0 attention, rank 1 all 4 experts, one node; 2 sequences, 1 micro-batch, 1 layer
    plan, work = SeparatedPlan(1, 1, 1, microbatches=1), Workload(batch=2, context=10)
    sim = simulate(plan, TOY, work, HW)
    a = cm.attention_cost(TOY, HW, 2, 10, 4, 4).compute_s  # checked by hand in test_costmodel
    e = cm.experts_cost(TOY, HW, (2.0, 2.0, 2.0, 2.0)).compute_s
    h = cm.head_cost(TOY, HW, 2, logit_rows=2).compute_s  # final norm + lm_head of both rows
    # padded blocks over NVLink (100 GB/s, 1 us), one round trip each way: 2 tokens x min(top-2, 4 local
    # experts) = 4 payload rows of 64 x 2 B, plus 1 header row on the way out: 640 B out, 512 B back
    a2e, e2a = 1e-6 + 640 / 1e11, 1e-6 + 512 / 1e11
    t1 = a + a2e  # both sides of the dispatch have arrived at `a`
    t2 = t1 + e + e2a
    expected = {
        (0, "attention(l0,mb0)"): (0, a),
        (0, "dispatch(l0,mb0)"): (a, t1),
        (1, "recv(l0,mb0)"): (0, t1),  # posted at 0, a NCCL kernel waiting for the sender
        (1, "experts(l0,mb0)"): (t1, t1 + e),
        (1, "send(l0,mb0)"): (t1 + e, t2),
        (0, "combine(l0,mb0)"): (t1, t2),
        (0, "head(mb0)"): (t2, t2 + h),
    }
    got = _timeline(sim)
    assert set(got) == set(expected)
    for key, (start, end) in expected.items():
        assert got[key] == (pytest.approx(start, abs=1e-15), pytest.approx(end, abs=1e-15)), key
    assert sim.tpot_s == pytest.approx(t2 + h)
    # busy: compute only; kernel active: rank 1's recv/send waits count (nvidia-smi sense)
    assert sim.busy_fraction == [pytest.approx((a + h) / sim.tpot_s), pytest.approx(e / sim.tpot_s)]
    assert sim.kernel_active[1] == pytest.approx(t2 / sim.tpot_s)


@pytest.mark.timeout(20)
def test_microbatches_overlap_on_streams_and_serialise_without():
    plan, work = SeparatedPlan(1, 1, 1, microbatches=2), Workload(batch=4, context=10)
    a = cm.attention_cost(TOY, HW, 2, 10, 4, 4).compute_s
    a2e = 1e-6 + 640 / 1e11  # as in the two-rank timeline
    overlap = _timeline(simulate(plan, TOY, work, HW))
    # compute stream: attention of mb1 right after mb0's, while mb0's dispatch runs on the comm stream
    assert overlap[0, "attention(l0,mb1)"][0] == pytest.approx(a)
    assert overlap[1, "experts(l0,mb0)"][0] == pytest.approx(a + a2e)
    assert overlap[0, "dispatch(l0,mb0)"] == (pytest.approx(a), pytest.approx(a + a2e))  # same time as mb1's attention
    serial = _timeline(simulate(plan, TOY, work, HW, overlap=False))
    # one stream (the blocking CPU runtime): mb1's attention waits for mb0's dispatch to complete
    assert serial[0, "attention(l0,mb1)"][0] == pytest.approx(a + a2e)


@pytest.mark.timeout(20)
def test_tp_pp_and_ep_transfers_match():
    toy2 = TOY.replace(num_layers=2)
    work = Workload(batch=4, context=10)
    tp = simulate(TpPpPlan(1, 2, 2), toy2, work, HW)  # stage 0 = rank 0 (layer 0), stage 1 = rank 1 (layer 1)
    t = _timeline(tp)
    for mb in (0, 1):
        send, recv = t[0, f"send_act(l0,mb{mb})"], t[1, f"recv_act(l1,mb{mb})"]
        assert send[1] == recv[1]  # one transfer, both ends complete together
        assert t[1, f"attention(l1,mb{mb})"][0] >= recv[1]
    assert (1, "head(mb1)") in t and (0, "head(mb0)") not in t
    ep = simulate(EpPlan(2, 2), toy2, work, HW)
    t = _timeline(ep)
    for key in ("dispatch(l1,mb1)", "combine(l0,mb0)"):
        assert t[0, key][1] == t[1, key][1]  # all-to-all: every rank completes together
    assert t[0, "experts(l0,mb0)"][0] >= t[0, "dispatch(l0,mb0)"][1]


@pytest.mark.timeout(20)
def test_unmatched_transfer_is_a_deadlock(monkeypatch):
    real = sim_mod.match
    monkeypatch.setattr(sim_mod, "match", lambda plan, rank, op: None if op.kind == "recv" else real(plan, rank, op))
    with pytest.raises(Deadlock, match=r"dispatch\(l0,mb0\)"):
        simulate(SeparatedPlan(1, 1, 1, microbatches=1), TOY, Workload(2, 10), HW)


@pytest.mark.timeout(20)
def test_paper_metrics_are_consistent():
    paper, a100 = preset("paper"), get_profile("a100-80g")
    work = Workload(24, 2048)
    for plan in (SeparatedPlan(12, 1, 4, 2), EpPlan(16, 2), TpPpPlan(8, 2, 2)):
        s = simulate(plan, paper, work, a100)
        assert s.tps == pytest.approx(24 / s.tpot_s)
        assert len(s.memory) == 16 and all(0 < m.total < a100.memory_bytes for m in s.memory)
        for busy, active in zip(s.busy_fraction, s.kernel_active):
            assert 0 <= busy <= active + 1e-9 and active <= 1 + 1e-9
        assert 0 < s.mbu_useful <= s.mbu < 1 and 0 < s.mfu < 1
        assert s.tpot_s > s.floor_s  # a true lower bound at the plan's m (perf/floor.py; tests/test_floor.py)


@pytest.mark.timeout(20)
def test_repeated_runs_are_identical_and_trace_format(tmp_path):
    paper, a100 = preset("paper"), get_profile("a100-80g")
    runs = [simulate(SeparatedPlan(3, 4, 4, 2), paper, Workload(24, 2048), a100) for _ in range(2)]
    assert [(r.rank, r.stream, str(r.op), r.start, r.end) for r in runs[0].records] == \
        [(r.rank, r.stream, str(r.op), r.start, r.end) for r in runs[1].records]
    assert runs[0].summary() == runs[1].summary()
    assert json.dumps(chrome_trace(runs[0])) == json.dumps(chrome_trace(runs[1]))
    doc = json.loads(write_trace(runs[0], tmp_path / "t.json").read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(runs[0].records)
    assert all({"name", "pid", "tid", "ts", "dur"} <= set(e) for e in spans)
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(runs[0].tpot_s * 1e6, rel=1e-6)
    png = gantt_png(runs[0], tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(20)
def test_expert_outputs_return_on_their_own_stream():
    # separated 1+1, m = 2: the expert rank receives mb0 and mb1, then computes and sends mb0. Its
    # send of mb0 runs on the third stream (the bridge's second group): it starts when experts(mb0)
    # ends, not when the receive of mb1 (queued before it on the dispatch stream) ends.
    plan, work = SeparatedPlan(1, 1, 1, microbatches=2), Workload(batch=4, context=10)
    sim = simulate(plan, TOY, work, HW)
    t = _timeline(sim)
    e = cm.experts_cost(TOY, HW, (2.0, 2.0, 2.0, 2.0)).compute_s
    e2a = 1e-6 + 512 / 1e11
    experts0_end = t[1, "experts(l0,mb0)"][1]
    assert t[1, "send(l0,mb0)"] == (pytest.approx(experts0_end), pytest.approx(experts0_end + e2a))
    assert t[1, "experts(l0,mb0)"][0] == pytest.approx(t[1, "recv(l0,mb0)"][1])
    assert experts0_end == pytest.approx(t[1, "recv(l0,mb0)"][1] + e)
    streams = {(r.rank, str(r.op)): r.stream for r in sim.records}
    assert streams[1, "send(l0,mb0)"] == streams[0, "combine(l0,mb0)"] == 2
    assert streams[1, "recv(l0,mb1)"] == streams[0, "dispatch(l0,mb1)"] == 1
