"""--config files, --plan files and the strategy rules of run / serve / train / bench: checked
in-process, before any rank would start (the commands are stopped at their first real work)."""
from __future__ import annotations

import re

import pytest

import masep.cli as cli
from masep.cli import build_parser, build_plan, main
from masep.config import preset
from masep.options import parse_args
from masep.plan import EpPlan, SeparatedPlan, read_plan_file


class Started(Exception):
    """Raised in place of the run: the command got past every check."""


def _exits_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def captured_run(monkeypatch):
    """`masep run` up to its rank launch: the args and plan it would run."""
    seen = {}

    def fake_run(args, cfg, source, tokenizer, requests):
        seen.update(args=args, cfg=cfg, source=source, plan=build_plan(args, cfg), requests=requests)
        raise Started

    monkeypatch.setattr(cli, "run_strategy", fake_run)
    return seen


def test_plan_out_then_run_plan_runs_that_plan(tmp_path, capsys, captured_run):
    out = tmp_path / "plan.toml"
    assert main(["plan", "--preset", "tiny", "--gpus", "3", "--hardware", "h100", "--batch", "4", "--context", "32",
                 "--strategies", "separated", "--top", "2", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    plan, doc = read_plan_file(str(out))
    assert plan.strategy == "separated" and plan.world_size == 3
    assert doc["planned_for"]["preset"] == "tiny" and doc["planned_for"]["gpus"] == 3
    assert doc["reasons"][0].startswith("winner: ") and doc["prediction"]["tpot_ms"] > 0
    with pytest.raises(Started):  # no --preset: the plan file's model
        main(["run", "--plan", str(out), "--batch", "2", "--prompt-len", "4", "--max-new-tokens", "2"])
    assert captured_run["plan"] == plan and captured_run["cfg"].name == "tiny"
    assert captured_run["args"].strategy == "separated"


def test_plan_notation_on_the_command_line(captured_run):
    with pytest.raises(Started):
        main(["run", "--preset", "tiny", "--plan", "ep2 m1 placement=0-7;0-3", "--batch", "2"])
    assert captured_run["plan"] == EpPlan(2, 1, placement=(tuple(range(8)), (0, 1, 2, 3)))


@pytest.mark.parametrize("flags,message", [
    (["--strategy", "ep"], "--strategy ep conflicts with --plan sep 1x2+1 m2, which sets --strategy separated"),
    (["--attn-tp", "1"], "--attn-tp 1 conflicts with --plan sep 1x2+1 m2, which sets --attn-tp 2"),
    (["--tp", "2"], "--tp 2: a flag of strategy tp_pp, but the strategy is separated (--plan sep 1x2+1 m2)"),
])
def test_flags_that_disagree_with_the_plan_are_refused(flags, message, capsys):
    assert message in _exits_2(["run", "--preset", "tiny", "--plan", "sep 1x2+1 m2", *flags], capsys)


def test_flags_that_agree_with_the_plan_pass(captured_run):
    with pytest.raises(Started):
        main(["run", "--preset", "tiny", "--plan", "sep 1x2+1 m2", "--strategy", "separated", "--attn-tp", "2",
              "--batch", "2"])
    assert captured_run["plan"] == SeparatedPlan(1, 2, 1, 2)


def test_config_file_with_command_line_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "tiny"\nstrategy = "separated"\nattn_tp = 2\nexpert-ranks = 1\nbatch = 3\n'
                      'check = true\nprompt = ["a", "b"]\ntimeout = 30\nplacement = "0-7"\n')
    args = parse_args(build_parser(), ["run", "--config", str(config), "--batch", "5", "--prompt", "c"])
    assert (args.preset, args.strategy, args.attn_tp, args.expert_ranks) == ("tiny", "separated", 2, 1)
    assert (args.batch, args.check, args.prompt, args.timeout) == (5, True, ["c"], 30.0)
    assert build_plan(args, preset("tiny")) == SeparatedPlan(1, 2, 1, 2, placement=(tuple(range(8)),))
    args = parse_args(build_parser(), ["run", "--config", str(config), "--model", "DIR"])
    assert (args.model, args.preset) == ("DIR", None)  # the command line's --model beats the file's preset


@pytest.mark.parametrize("text,message", [
    ("bogus_key = 1\n", "unknown key 'bogus_key'; valid keys (this command's flags): attn-replicas,"),
    ('batch = "8"\n', "batch = '8': must be an integer"),
    ("check = 1\n", "must be true or false"),
    ('strategy = "fast"\n', "must be one of"),
    ("timeout = -1\n", "must be a finite number of seconds > 0"),
    ("[run]\nbatch = 1\n", "[run] is a table"),
    ("batch = \n", "not valid TOML"),
])
def test_bad_config_files_name_the_key(tmp_path, capsys, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text)
    assert message in _exits_2(["run", "--config", str(config)], capsys)


@pytest.mark.parametrize("argv,message", [
    (["run", "--preset", "tiny", "--tp", "2", "--pp", "2"],
     "--tp 2: a flag of strategy tp_pp, but the strategy is single (the default); use --strategy tp_pp or drop --tp"),
    (["run", "--preset", "tiny", "--strategy", "tp_pp", "--expert-ranks", "2"], "--expert-ranks 2: a flag of "
     "strategy separated, but the strategy is tp_pp (--strategy)"),
    (["run", "--preset", "tiny", "--strategy", "ep", "--seq-split"], "--seq-split: a flag of strategy separated"),
    (["run", "--preset", "tiny", "--microbatches", "2"], "--microbatches 2: a flag of strategies separated, tp_pp, ep"),
    (["run", "--preset", "tiny", "--strategy", "ep", "--protection", "none"], "--protection none: a flag of strategy "
     "separated"),
    (["serve", "--preset", "tiny", "--trace", "t"], "with strategy single the model runs on the server's own threads"),
    (["serve", "--preset", "tiny", "--join-timeout", "5"], "--join-timeout 5.0: a flag of strategy separated, but the "
     "strategy is single (the default)"),
    (["serve", "--preset", "tiny", "--strategy", "ep", "--ep", "2", "--join-timeout", "0"], "--join-timeout 0.0: a "
     "flag of strategy separated"),
    (["train", "--preset", "tiny", "--grad-compression", "int8"], "--grad-compression int8: a flag of strategies"),
    (["train", "--preset", "tiny", "--strategy", "ep", "--tp", "2"], "--tp 2: a flag of strategy tp_pp"),
    (["bench", "dist", "--preset", "tiny", "--strategy", "ep", "--trace", "t"], "masep bench dist does not take it"),
    (["bench", "dist", "--preset", "tiny"], "give --strategy (separated, tp_pp, ep) or a --plan of one"),
])
def test_flags_of_another_strategy_are_refused(argv, message, capsys):
    assert message in _exits_2(argv, capsys)


def test_strategy_foreign_flag_from_a_config_file_names_it(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("ep = 4\n")
    err = _exits_2(["run", "--preset", "tiny", "--config", str(config)], capsys)
    assert f"--ep 4 (from --config {config}): a flag of strategy ep, but the strategy is single" in err


def test_train_single_takes_microbatches_and_its_plan_notation(monkeypatch, capsys):
    import masep.train.cli as train_cli

    def stop(*_):
        raise Started

    monkeypatch.setattr(train_cli, "_corpus", stop)
    with pytest.raises(Started):
        main(["train", "--preset", "tiny", "--microbatches", "2", "--batch-size", "4"])
    assert "seq-split" in _exits_2(["train", "--preset", "tiny", "--plan", "sep 1x1+1 m2 seq-split"], capsys)


def test_train_short_run_needs_no_warmup_flag(monkeypatch, capsys):
    import masep.train.cli as train_cli
    seen = {}

    def stop(args, *_):
        seen["warmup"] = args.warmup
        raise Started

    monkeypatch.setattr(train_cli, "_corpus", stop)
    with pytest.raises(Started):  # the default warm-up (10) would exceed --steps 5
        main(["train", "--preset", "tiny", "--steps", "5"])
    assert seen["warmup"] == 2
    with pytest.raises(Started):
        main(["train", "--preset", "tiny", "--steps", "50"])
    assert seen["warmup"] == 10
    assert "--warmup 5: must be below --steps 5" in _exits_2(["train", "--preset", "tiny", "--steps", "5",
                                                               "--warmup", "5"], capsys)


def test_trace_of_strategy_single(tmp_path):
    trace = tmp_path / "trace"
    assert main(["run", "--preset", "tiny", "--batch", "1", "--prompt-len", "3", "--max-new-tokens", "2",
                 "--warmup", "0", "--json", "--trace", str(trace)]) == 0
    assert [p.name for p in trace.iterdir()] == ["rank0.json"]


@pytest.mark.parametrize("command", ["run", "serve", "train", "plan", "simulate", "sweep", "replan", "calcheck"])
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert not re.search(r"\(default[^()]*\) \(default:", text)  # "(default: small) (default: None)"
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    if command in ("run", "serve"):
        assert "(default: small)" in text and "--strategy {ep,separated,single,tp_pp} single: one device" in text


def test_serve_logs_its_plan_before_any_check(monkeypatch, capsys):
    def stop(*_):
        raise Started

    monkeypatch.setattr(cli, "check_serve_memory", stop)
    with pytest.raises(Started):
        main(["serve", "--preset", "tiny", "--plan", "sep 1x2+1 m2", "--port", "8765"])
    assert "[front] INFO masep serve: plan sep 1x2+1 m2 (3 ranks) on tiny (cpu, float32), http://127.0.0.1:8765" in \
        capsys.readouterr().err
