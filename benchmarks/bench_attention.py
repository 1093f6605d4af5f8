"""Decode attention alone, on one CUDA GPU: split-KV (masep/decode_attention.py) against the
model's masked SDPA (model.Attention._attend), each replayed from a CUDA graph.

    python benchmarks/bench_attention.py --out attention.json

For each shape (rows, query heads, KV heads, keys, head_dim; every row attends to all `keys`
keys, as in `masep bench decode`) a row holds both times (CUDA events, median of graph replays),
the bytes the step must read (K and V of every row: rows x KV heads x keys x head_dim x 2 x
element size), that over each time as GB/s and as a fraction of the copy bandwidth measured in
the same run, and the largest difference between the two outputs relative to their scale.
The shapes are the `paper` model's attention per rank at the decode benchmark's points: one GPU
(32 heads), a TP2 rank (16), and GQA layouts (32 query heads over 8 KV heads, and half of that
on a TP2 rank). Split-KV runs only where `decode_attention.covers` lets it (GQA).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from masep.config import preset
from masep.decode_attention import chunk_len, covers, decode_attention, num_splits
from masep.model import Attention
from masep.perf.bench import device_meta, measure_copy_bandwidth, time_graph

POINTS = [(1, 2048), (24, 2048), (128, 2048), (512, 2048), (2048, 512)]
LAYOUTS = [("one GPU", 32, 32), ("TP2 rank", 16, 16), ("GQA 32/8", 32, 8), ("GQA 16/4", 16, 4)]


def bench_shape(rows: int, heads: int, kv_heads: int, keys: int, copy_bw: float, head_dim: int = 128) -> dict:
    cfg = preset("paper").replace(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_seq_len=keys)
    attn = Attention(cfg, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(rows, kv_heads, keys + 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    positions = torch.full((rows, 1), keys - 1, device="cuda")
    key_pos = torch.arange(keys, device="cuda").expand(rows, keys)
    lengths = positions[:, 0] + 1
    kk, vv = k[:, :, :keys], v[:, :, :keys]
    scale = 1.0 / math.sqrt(head_dim)
    sdpa = lambda: attn._attend(q, kk, vv, positions, key_pos)  # noqa: E731
    split = lambda: decode_attention(q[:, :, 0], kk, vv, lengths, scale)  # noqa: E731
    nbytes = 2 * rows * kv_heads * keys * head_dim * k.element_size()
    t_sdpa = time_graph(sdpa)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = num_splits(rows, kv_heads, keys, sms)
    t_split, by_splits, diff = None, {}, None
    if covers(heads // kv_heads, head_dim):  # MHA layouts keep the masked SDPA (covers says why)
        ref = sdpa()[:, :, 0].float()
        diff = float((split().float() - ref).norm() / ref.norm())
        t_split = time_graph(split)
        # the chunk counts the heuristic did not pick, to check it: ms per forced count
        by_splits = {c: time_graph(lambda c=c: decode_attention(q[:, :, 0], kk, vv, lengths, scale, splits=c))
                     for c in (1, 2, 4, 8, 16) if c != splits and chunk_len(keys, c) * (c - 1) < keys}
    share = (lambda t: nbytes / (t / 1e3) / copy_bw if t else None)  # noqa: E731
    return dict(rows=rows, heads=heads, kv_heads=kv_heads, keys=keys, head_dim=head_dim, bytes=nbytes,
                splits=splits, chunk=chunk_len(keys, splits), sdpa_ms=t_sdpa, split_kv_ms=t_split,
                split_kv_ms_by_splits=by_splits, floor_ms=nbytes / copy_bw * 1e3,
                sdpa_of_copy_bw=share(t_sdpa), split_kv_of_copy_bw=share(t_split), rel_diff=diff)


def markdown(doc: dict) -> str:
    """The document as a table: ms and share of the copy bandwidth per kernel and shape."""
    meta = doc["meta"]
    lines = [f"# Decode attention alone: split-KV vs masked SDPA, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['timing']}; bf16, head_dim 128, every row "
             f"attends to all keys; copy bandwidth {meta['copy_bw_measured'] / 1e12:.2f} TB/s (read + written). "
             "floor = K and V bytes / copy bandwidth; a kernel that only reads can pass 1.0. Split-KV runs only on "
             "GQA layouts (decode_attention.covers).", "",
             "| layout (query/KV heads) | rows x keys | floor ms | SDPA ms (of copy bw) | split-KV ms (of copy bw) "
             "| chunks | rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        split = (f"{r['split_kv_ms']:.3f} ({r['split_kv_of_copy_bw']:.2f})", str(r["splits"]), f"{r['rel_diff']:.1e}") \
            if r.get("split_kv_ms") else ("-", "-", "-")
        layout = r["layout"] if "/" in r["layout"] else f"{r['layout']} ({r['heads']}/{r['kv_heads']})"
        lines.append(f"| {layout} | {r['rows']} x {r['keys']} | {r['floor_ms']:.3f} | "
                     f"{r['sdpa_ms']:.3f} ({r['sdpa_of_copy_bw']:.2f}) | " + " | ".join(split) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON document; a markdown table is written beside it")
    parser.add_argument("--report", action="store_true", help="only write the table of an existing --out document")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        out.with_suffix(".md").write_text(markdown(json.loads(out.read_text())))
        return
    copy_bw = measure_copy_bandwidth()
    rows = []
    for label, heads, kv in LAYOUTS:
        for batch, keys in POINTS:
            row = dict(layout=label, **bench_shape(batch, heads, kv, keys, copy_bw))
            torch.cuda.empty_cache()  # the shape's cache went with bench_shape's frame
            rows.append(row)
            split = (f"split-kv {row['split_kv_ms']:.3f} ms ({row['split_kv_of_copy_bw']:.2f}, {row['splits']} "
                     f"chunks; other counts " + " ".join(f"{c}:{t:.3f}" for c, t in row["split_kv_ms_by_splits"].items())
                     + f"), rel diff {row['rel_diff']:.1e}") if row["split_kv_ms"] else "split-kv: not for MHA"
            print(f"{label:9s} B={batch:5d} S={keys:5d}: floor {row['floor_ms']:.3f} ms, sdpa {row['sdpa_ms']:.3f} ms "
                  f"({row['sdpa_of_copy_bw']:.2f} of copy bw), {split}", flush=True)
    doc = dict(meta=dict(**device_meta(), copy_bw_measured=copy_bw, timing="cuda_events (graph replays)",
                         triton=__import__("triton").__version__), rows=rows)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))


if __name__ == "__main__":
    main()
