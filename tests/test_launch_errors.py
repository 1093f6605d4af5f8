"""`masep run` / `masep serve` refuse what would fail later, before any model is built or rank spawned.

Each test reproduces a user report: a bad value that used to pass validation and then crash the
ranks, wait out a timeout, or fail only after generation. Now each exits 2 at once with a message
naming the value and the rule (or, for `--check`, exits 1 instead of calling garbage identical).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from masep.cli import main

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
TINY = ["--batch", "2", "--prompt-len", "4", "--max-new-tokens", "2", "--warmup", "0"]
SEPARATED = ["--strategy", "separated", "--attn-tp", "2", "--expert-ranks", "1"]  # 3 ranks


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    """Tests start from a shell without torchrun's variables (each test sets the ones it needs)."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def _limit_memory() -> None:
    # A safety net for a regression: a run that allocates what it should have refused fails
    # with an allocator error instead of taking the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


def masep(*args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS} | (env or {})
    return subprocess.run([sys.executable, "-m", "masep", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, preexec_fn=_limit_memory)


def exits_2(argv: list[str], capsys) -> str:
    """Run `masep argv` in this process; it must exit 2. Returns stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    return err


def rewrite(path, edit) -> None:
    tensors = edit(load_file(path / "model.safetensors"))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


# --- 1. --timeout ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
@pytest.mark.parametrize("command", [["run", "--preset", "tiny", *TINY, *SEPARATED],
                                     ["serve", "--preset", "tiny", *SEPARATED],
                                     ["bench", "dist", "--preset", "tiny", *SEPARATED]],
                         ids=["run", "serve", "bench-dist"])
def test_timeout_must_be_a_finite_positive_number(command, value, capsys):
    err = exits_2([*command, f"--timeout={value}"], capsys)
    assert f"--timeout: {value!r}" in err or f"--timeout={value}" in err, err
    assert "finite number of seconds > 0" in err, err


# --- 2. leftover torchrun variables ------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("env, names", [
    (dict(RANK="0", WORLD_SIZE="3"), ["RANK=0", "WORLD_SIZE=3", "MASTER_ADDR", "MASTER_PORT"]),
    (dict(LOCAL_RANK="1"), ["LOCAL_RANK=1", "RANK", "WORLD_SIZE"]),
    (dict(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"), ["MASTER_ADDR=10.0.0.1", "MASTER_PORT=29500", "RANK"]),
])
def test_some_torchrun_variables_without_the_others_exit_2(env, names):
    out = masep("run", "--preset", "tiny", *TINY, *SEPARATED, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    for name in names:
        assert name in out.stderr, (name, out.stderr)
    assert "unset" in out.stderr and "torchrun" in out.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env, message", [
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"),
     "plan.world_size=2: the launch has 2 ranks but the plan needs 3"),
    (dict(RANK="x", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"), "RANK='x'"),
    (dict(RANK="3", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"), "RANK=3"),
    (dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="99999"), "MASTER_PORT='99999'"),
])
def test_torchrun_variables_that_cannot_describe_this_launch_exit_2(env, message):
    out = masep("run", "--preset", "tiny", *TINY, *SEPARATED, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "unset" in out.stderr, out.stderr


@pytest.mark.timeout(60)
def test_leftover_torchrun_variables_are_named_before_waiting_for_peers():
    """A full, consistent set that torchrun did not make (no TORCHELASTIC_RUN_ID) may be a real
    hand-made launch, so it is joined; but the user is told at once which variables make masep
    wait, and the rendezvous timeout names them again."""
    env = dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    out = masep("run", "--preset", "tiny", *TINY, *SEPARATED, "--timeout", "2", env=env)
    assert out.returncode != 0
    head = out.stderr.splitlines()[0]
    for text in ("RANK=0", "WORLD_SIZE=3", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=29517", "unset", "torchrun"):
        assert text in head, (text, out.stderr)
    assert "could not join" in out.stderr and "MASTER_PORT=29517" in out.stderr.splitlines()[-1], out.stderr


# --- 3. --trace ---------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["a regular file", "below a regular file"])
def test_trace_dir_that_cannot_be_written_exits_2_before_any_rank(tmp_path, where, capsys):
    file = tmp_path / "results.json"
    file.write_text("{}")
    trace = file if where == "a regular file" else file / "traces"
    err = exits_2(["run", "--preset", "tiny", *TINY, *SEPARATED, "--trace", str(trace)], capsys)
    assert f"--trace {trace}" in err, err
    assert file.read_text() == "{}"


@pytest.mark.timeout(30)
def test_trace_dir_check_leaves_a_good_dir_usable(tmp_path):
    from masep.cli import check_trace_dir
    check_trace_dir(str(tmp_path / "new" / "traces"))
    assert (tmp_path / "new" / "traces").is_dir() and not any((tmp_path / "new" / "traces").iterdir())


# --- 4. checkpoint errors -----------------------------------------------------------------------
def _no_config(path):
    (path / "config.json").unlink()


def _llama(path):
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))


def _no_weights(path):
    (path / "model.safetensors").unlink()


def _wrong_shape(path):
    rewrite(path, lambda t: {**t, "model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 32)})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("strategy", [[], SEPARATED], ids=["single", "separated"])
@pytest.mark.parametrize("damage, message", [
    (_no_config, r"config.json: no config.json found"),
    (_llama, r"config.json: model_type='llama' is not supported"),
    (_no_weights, r"no model.safetensors or model.safetensors.index.json"),
    (_wrong_shape, r"model.safetensors: tensor 'model.layers.1.self_attn.q_proj.weight' has shape \[64, 32\]"),
], ids=["no-config", "model-type", "no-weights", "wrong-shape"])
def test_bad_checkpoint_exits_2_before_any_rank(tiny_checkpoint, damage, message, strategy, capsys):
    import re
    _, path = tiny_checkpoint("mixtral")
    damage(path)
    err = exits_2(["run", "--model", str(path), *TINY, *strategy], capsys)
    assert re.search(message, err), err


# --- 5. non-finite weights, non-finite logits ---------------------------------------------------
def _poison(path, key="model.layers.1.self_attn.v_proj.weight"):
    def edit(t):
        w = t[key].clone()
        w[0, :3] = float("nan")
        w[1, 0] = float("inf")
        return {**t, key: w}
    rewrite(path, edit)


@pytest.mark.timeout(30)
def test_from_pretrained_refuses_non_finite_weights(tiny_checkpoint):
    import masep
    _, path = tiny_checkpoint("mixtral")
    _poison(path)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.self_attn.v_proj.weight' "
                                         r"holds 4 non-finite values \(NaN or inf\)"):
        masep.from_pretrained(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", [["run", *TINY], ["run", *TINY, *SEPARATED], ["serve"], ["serve", *SEPARATED]],
                         ids=["run-single", "run-separated", "serve-single", "serve-separated"])
def test_non_finite_weights_exit_2(tiny_checkpoint, command, capsys):
    _, path = tiny_checkpoint("mixtral")
    _poison(path)
    err = exits_2([*command, "--model", str(path)], capsys)
    assert "tensor 'model.layers.1.self_attn.v_proj.weight' holds 4 non-finite values" in err, err


@pytest.mark.timeout(60)
def test_check_fails_when_the_logits_are_not_finite(tiny_checkpoint, capsys):
    """Finite weights can still overflow: both sides then emit the same garbage tokens, which
    `--check` must not call identical."""
    _, path = tiny_checkpoint("mixtral")
    rewrite(path, lambda t: {**t, "model.norm.weight": torch.full_like(t["model.norm.weight"], 3e38)})
    assert main(["run", "--model", str(path), *TINY, "--check", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["rows"][0]
    assert report["check"]["match"] is False and report["check"]["non_finite_logits"] > 0
    assert main(["run", "--model", str(path), *TINY, "--check"]) == 1
    assert "non-finite logits" in capsys.readouterr().out


# --- 6. memory ----------------------------------------------------------------------------------
def _kv_slot_bytes(preset: str, max_len: int) -> int:
    from masep.config import preset as get
    cfg = get(preset)
    return 2 * cfg.num_layers * cfg.num_kv_heads * (max_len + 1) * cfg.head_dim * 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", [[], SEPARATED], ids=["single", "separated"])
def test_kv_cache_larger_than_memory_exits_2_before_allocating(strategy):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    slots = 2 * ram // _kv_slot_bytes("tiny", 256) + 1
    out = masep("run", "--preset", "tiny", *TINY, *strategy, "--max-model-len", "256", "--max-num-seqs", str(slots))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--max-num-seqs" in out.stderr and f"{ram} bytes" in out.stderr and "RAM" in out.stderr, out.stderr


@pytest.mark.timeout(30)
def test_memory_estimate_is_what_the_model_allocates():
    from masep.cli import rank_memory_needs
    from masep.config import preset
    from masep.model import build_model
    cfg = preset("tiny")
    model = build_model(cfg)
    cache = model.new_cache(3, 20)
    need = rank_memory_needs(cfg, None, 3, 20)[0]
    assert need.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert need.kv_cache == sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [
    ["run", "--preset", "small"],
    ["run", "--preset", "small", "--strategy", "separated", "--attn-tp", "3", "--expert-ranks", "1", "--check"],
    ["run", "--preset", "small", "--strategy", "separated", "--attn-replicas", "2", "--attn-tp", "2",
     "--expert-ranks", "2", "--microbatches", "3"],
    ["run", "--preset", "small", "--strategy", "tp_pp", "--tp", "2", "--pp", "2"],
    ["run", "--preset", "small", "--strategy", "ep", "--ep", "4"],
    ["serve", "--preset", "small", "--strategy", "separated", "--attn-replicas", "2", "--expert-ranks", "2",
     "--max-num-seqs", "8"],
    ["serve", "--preset", "small"],
])
def test_memory_check_passes_the_documented_commands(argv):
    """The README's CPU commands need under 1 GiB: the check must let them through on any machine
    (here with the model's whole max_seq_len per slot, more than `run` allocates)."""
    from masep.cli import build_parser, build_plan, cpu_memory_problem, peak_bytes
    from masep.config import preset
    args = build_parser().parse_args(argv)
    cfg = preset("small")
    plan = build_plan(args, cfg) if args.strategy != "single" else None
    slots = args.max_num_seqs or getattr(args, "batch", 16)
    need, _ = peak_bytes(cfg, plan, slots, cfg.max_seq_len, drawn=True)
    assert 0 < need < 1 << 30, need  # tens of MB per rank (its part, plus one draw unit at start-up)
    assert cpu_memory_problem(cfg, plan, slots, cfg.max_seq_len, True, oracle_slots=slots) is None
