"""Two torchrun agents on loopback, as two hosts would run them (c10d rendezvous, gloo).

Each agent starts its "node's" ranks; ranks are numbered node by node. `masep run` on a
separated plan whose replicas land on different nodes gives the single-device model's tokens,
and `masep train` takes the node size from torchrun's LOCAL_WORLD_SIZE, so the attention
gradients of an EP plan across the two nodes take the hierarchical all-reduce.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], per_node: int = 2, timeout: int = 150) -> list[subprocess.CompletedProcess]:
    """Start two torchrun agents (one per "host") and wait for both; returns their results."""
    port = _free_port()
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(per_node),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"masep-{port}",
           "-m", "masep", *args]
    agents = [subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out = []
    try:
        for a in agents:
            stdout, stderr = a.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(run, a.returncode, stdout, stderr))
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    for r in out:
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def _document(results) -> dict:
    """The one JSON document rank 0 printed (on whichever agent holds it)."""
    lines = [line for r in results for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, [r.stdout[-500:] for r in results]
    return json.loads(lines[0])


COMMON = ["--preset", "tiny", "--batch", "4", "--prompt-len", "6", "--max-new-tokens", "4", "--seed", "3",
          "--warmup", "0", "--json"]


# node 0 holds ranks 0 and 1, node 1 ranks 2 and 3. separated: the two attention replicas on node 0,
# the expert ranks on node 1, so every bridge crosses the node boundary; ep4: the all-to-all spans
# both nodes; tp2pp2: a TP group per node, the stage-to-stage transfer and the logits broadcast cross it
PLANS_ACROSS_NODES = {"separated": ["--strategy", "separated", "--attn-replicas", "2", "--expert-ranks", "2"],
                      "ep4": ["--strategy", "ep", "--ep", "4"],
                      "tp2pp2": ["--strategy", "tp_pp", "--tp", "2", "--pp", "2"]}


@pytest.fixture(scope="module")
def single_device_tokens():
    single = subprocess.run([sys.executable, "-m", "masep", "run", *COMMON, "--strategy", "single"],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(single.stdout)["rows"][0]["tokens"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("plan", list(PLANS_ACROSS_NODES))
def test_every_strategy_across_two_nodes_gives_the_single_device_tokens(plan, single_device_tokens):
    doc = _document(_two_nodes(["run", *COMMON, *PLANS_ACROSS_NODES[plan]]))
    assert doc["rows"][0]["tokens"] == single_device_tokens


@pytest.mark.timeout(300)
def test_training_across_two_nodes_sums_gradients_hierarchically(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"the expert rank {i % 7} holds the weights of layer {i % 3}." for i in range(400)))
    doc = _document(_two_nodes(["train", "--preset", "small", "--strategy", "ep", "--ep", "4", "--microbatches", "1",
                                "--data", str(text), "--vocab-size", "300", "--seq-len", "16", "--batch-size", "4",
                                "--steps", "2", "--cache-dir", str(tmp_path / "cache"), "--log-dir",
                                str(tmp_path / "log"), "--json"]))
    assert doc["meta"]["grad_sync"]["0 1 2 3"].startswith("hierarchical: 2 nodes x 2 ranks"), doc["meta"]["grad_sync"]
    assert len(doc["rows"]) == 2 and all(r["loss"] == r["loss"] for r in doc["rows"])
