"""The torchrun restart path: a rank dies, torchrun's agent stops every worker and starts them
again (--max-restarts 1), the ranks rejoin, and `masep run --journal` runs only the requests
the first attempt had not finished: none is lost, none runs twice, the tokens are the
single-device model's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from masep.engine.journal import Journal

ARGS = ["--preset", "tiny", "--batch", "6", "--max-new-tokens", "16", "--warmup", "0", "--json"]


@pytest.mark.timeout(300)
def test_a_killed_rank_restarts_the_job_and_the_journal_keeps_what_was_done(tmp_path):
    journal = tmp_path / "run.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--max-restarts", "1",
                "--standalone", "-m", "masep", "run"]
    # two slots per replica: the six requests run in two waves, and the expert rank is killed
    # (first attempt only) after the first wave has finished
    out = subprocess.run([*torchrun, *ARGS, "--strategy", "separated", "--attn-replicas", "2", "--expert-ranks", "1",
                          "--max-num-seqs", "2", "--journal", str(journal), "--inject-fault", "kill@2:20"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exitcode: -9" in out.stderr  # the first attempt did lose a rank
    rep = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))["rows"][0]
    single = json.loads(subprocess.run([sys.executable, "-m", "masep", "run", *ARGS, "--strategy", "single"],
                                       capture_output=True, text=True, timeout=120, check=True).stdout)["rows"][0]
    assert rep["tokens"] == single["tokens"]
    restored = rep["restored_from_journal"]
    assert 0 < len(restored) < 6  # some finished before the failure, the rest ran after the restart
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert sorted(e["index"] for e in entries) == list(range(6))  # each request recorded exactly once


def test_a_journal_of_other_requests_is_refused(tmp_path):
    from masep.engine import Request
    path = tmp_path / "j.jsonl"
    a = Journal(path, [Request([1, 2, 3], 4)])
    assert a.load() == {}
    a.record(0, [5, 6, 7, 8], "length", None)
    assert Journal(path, [Request([1, 2, 3], 4)]).load() == {0: {"index": 0, "tokens": [5, 6, 7, 8],
                                                                 "finish_reason": "length", "error": None}}
    with pytest.raises(ValueError, match="written for other requests"):
        Journal(path, [Request([1, 2, 4], 4)]).load()
    path.write_text(path.read_text() + '{"index": 1, "tok')  # an attempt killed mid-write
    assert list(Journal(path, [Request([1, 2, 3], 4)]).load()) == [0]
