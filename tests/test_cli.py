"""The `masep` command: JSON output through a real subprocess, argument errors exit 2."""
import json
import subprocess
import sys

import pytest
import torch

from masep.cli import STRATEGIES, main, print_texts
from masep.engine import Request, generate, random_prompts
from masep.runtime import LocalRuntime

RUN = [sys.executable, "-m", "masep", "run"]
TINY = ["--preset", "tiny", "--batch", "2", "--prompt-len", "8", "--max-new-tokens", "4"]


@pytest.mark.timeout(120)
def test_run_json_through_a_subprocess():
    proc = subprocess.run(RUN + TINY + ["--json"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one JSON document and nothing else on stdout
    report, meta = doc["rows"][0], doc["meta"]
    assert report["prompts"] == random_prompts(2, 8, 256, seed=0)
    assert [len(t) for t in report["tokens"]] == [4, 4] and report["errors"] == [None, None]
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                "p99_tpot_ms", "output_throughput", "total_output_tokens", "duration"):
        assert isinstance(report[key], float | int), key
    assert (report["completed"], report["failed"], report["total_output_tokens"]) == (2, 0, 8)
    assert meta["command"] == "run" and meta["model"]["name"] == "tiny" and meta["model"]["vocab_size"] == 256
    cfg = meta["config"]
    assert (cfg["strategy"], cfg["batch"], cfg["dtype"], cfg["device"], cfg["seed"]) == ("single", 2, "float32", "cpu", 0)
    assert meta["versions"]["torch"] == torch.__version__ and meta["args"]["max_new_tokens"] == 4


@pytest.mark.timeout(60)
def test_run_table_in_process(capsys):
    assert main(["run"] + TINY + ["--dtype", "bfloat16", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "dtype bfloat16" in out and "Mean TPOT (ms):" in out and "Output token throughput" in out


def test_request_texts_are_escaped_once(capsys):
    class Decoder:
        def decode(self, ids):
            return "a\tb\ufffd"

    print_texts({"prompts": [[1]], "texts": ["x\x05y"], "tokens": [[5, 6]]}, Decoder())
    assert capsys.readouterr().out == "request 0 (1 -> 2 tokens): 'a\\tb\ufffd' -> 'x\\x05y'\n"
    from masep.tokenizer import ByteTokenizer
    print_texts({"prompts": [[104, 105]], "texts": [""], "tokens": [[3000]]}, ByteTokenizer(4096))
    assert capsys.readouterr().out.splitlines() == [
        "text: the built-in byte tokenizer gives ids 0-255 a byte each and ids 256-4095 no text, so a random-weight "
        "model's text is short noise", "request 0 (2 -> 1 tokens): 'hi' -> ''"]


@pytest.mark.timeout(60)
def test_strategies_registry():
    assert "single" in STRATEGIES


BAD_ARGS = {  # expected message -> arguments after `run`
    "--batch=0: must be >= 1": ["--preset", "tiny", "--batch", "0"],
    "--prompt-len 250 + --max-new-tokens 10 = 260 exceeds the model's max_seq_len=256":
        ["--preset", "tiny", "--prompt-len", "250", "--max-new-tokens", "10"],
    "--top-p=1.5: must be in (0, 1]": ["--preset", "tiny", "--top-p", "1.5"],
    "--temperature=-1.0: must be >= 0": ["--preset", "tiny", "--temperature", "-1"],
    "--top-k=-2: must be >= 0": ["--preset", "tiny", "--top-k", "-2"],
    "invalid choice: 'huge'": ["--preset", "huge"],
    "not allowed with argument": ["--preset", "tiny", "--model", "/some/dir"],
    "no config.json found": ["--model", "/nonexistent/dir"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("message", sorted(BAD_ARGS))
def test_bad_arguments_exit_2_with_a_message(message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", *BAD_ARGS[message]])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--preset", "tiny", "--device", "cuda"])
    assert exc.value.code == 2 and "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_bad_argument_through_a_subprocess():
    proc = subprocess.run(RUN + ["--batch", "-3"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2 and "--batch=-3: must be >= 1" in proc.stderr and proc.stdout == ""


@pytest.mark.timeout(60)
def test_run_from_a_checkpoint_dir(tiny_checkpoint, capsys):
    """`--model DIR` generates the same greedy tokens as the engine over the saved model."""
    model, path = tiny_checkpoint("mixtral")
    assert main(["run", "--model", str(path), "--batch", "2", "--prompt-len", "6", "--max-new-tokens", "5",
                 "--warmup", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    report = doc["rows"][0]
    assert doc["meta"]["config"]["model_source"]["path"] == str(path)
    expected = generate(LocalRuntime(model), [Request(p, 5) for p in report["prompts"]]).tokens
    assert report["tokens"] == expected
