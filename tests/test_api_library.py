"""The library API (masep/api.py, docs/api.md): the documented example runs as written, and each
function gives what the code under the matching command gives."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import masep
from masep.engine import Request, generate
from masep.runtime import LocalRuntime

ROOT = Path(__file__).resolve().parent.parent


def test_import_masep_leaves_the_api_unloaded():
    code = ("import sys, masep; assert 'masep.api' not in sys.modules; masep.generate; "
            "assert 'masep.api' in sys.modules; assert masep.SeparatedPlan.__module__ == 'masep.plan'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.timeout(240)
def test_docs_example_runs(tmp_path):
    """The first python block of docs/api.md, run as a script (it spawns 2 gloo ranks)."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(block)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=230)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12+4 split:" in out.stdout and "winner:" in out.stdout


def test_single_device_generate_matches_the_engine():
    model = masep.load_model("tiny", seed=3)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    got = masep.generate(model, prompts, max_new_tokens=5, temperature=0.8, top_k=20, ignore_eos=True)
    want = generate(LocalRuntime(masep.build_model(model.config, seed=3)),
                    [Request(p, 5, temperature=0.8, top_k=20, seed=3 + i) for i, p in enumerate(prompts)])
    assert got.tokens == want.tokens and got.errors == [None, None]
    assert got.texts == [model.tokenizer.decode(t) for t in got.tokens]


def test_a_request_too_long_fails_alone():
    model = masep.load_model("tiny")
    out = masep.generate(model, [[1] * 300, [1, 2]], max_new_tokens=4, ignore_eos=True)
    assert out.errors[0] is not None and out.errors[1] is None and len(out.tokens[1]) == 4


def test_plans_from_notation_and_errors():
    model = masep.load_model("tiny")
    assert masep.make_plan("sep 2x1+2 m3", model) == masep.SeparatedPlan(2, 1, 2, 3)
    assert masep.make_plan(masep.EpPlan(2, 1), "tiny").world_size == 2
    with pytest.raises(ValueError, match="attn_tp"):
        masep.make_plan("sep 1x9+1", model)  # tiny has 8 heads
    with pytest.raises(ValueError):
        masep.make_plan("sideways 4", model)
    with pytest.raises(ValueError, match="exactly one"):
        masep.load_model()


def test_simulate_and_planner_agree():
    sim = masep.simulate("ep16 m1", "paper", hardware="a100-80g", batch=24, context=2048)
    search = masep.search_plans("paper", 16, hardware="a100-80g", batch=24, context=2048, top=3)
    assert search.best.tpot_s <= sim.tpot_s
    assert [s.tpot_s for s in search.ranked] == sorted(s.tpot_s for s in search.ranked)
    assert "T_a/T_e" in masep.explain(search.best)
    with pytest.raises(ValueError):
        masep.search_plans("paper", 16, strategies=["nope"])


def test_serve_argv_is_a_valid_serve_command():
    from masep.cli import build_parser
    model = masep.load_model("tiny", seed=4)
    plan = masep.SeparatedPlan(2, 1, 2, 3, placement=((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 4, 5, 6, 7)))
    argv = masep.api.serve_argv(model, plan, port=8123, extra_args=["--max-num-seqs", "4"])
    args = build_parser().parse_args(argv)
    assert (args.command, args.preset, args.seed, args.strategy, args.attn_replicas, args.expert_ranks,
            args.microbatches, args.port, args.max_num_seqs) == ("serve", "tiny", 4, "separated", 2, 2, 3, 8123, 4)
    from masep.plan import parse_placement
    assert parse_placement(args.placement) == plan.placement


@pytest.mark.timeout(240)
def test_train_model_through_a_split(tmp_path):
    """Two steps through separated 1+1 on a small text file, tokenised by a BPE trained on it
    (tests/test_train.py checks training's numbers against a single-device trainer)."""
    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly farmers".split()
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(80)))
    report = masep.train_model(masep.load_model("small"), "sep 1x1+1 m1", data=[str(corpus)], steps=2, seq_len=16,
                               batch_size=2, warmup=1, log_dir=str(tmp_path / "log"), cache_dir=str(tmp_path / "cache"))
    losses = [r["loss"] for r in report["history"]]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert (tmp_path / "log" / "train.jsonl").is_file() and (tmp_path / "log" / "tokenizer" / "tokenizer.json").is_file()


def test_mirror_needs_two_replicas():
    with pytest.raises(ValueError, match="mirror"):
        masep.generate(masep.load_model("tiny"), [[1, 2]], plan="sep 1x1+1 m1", protection="mirror")
