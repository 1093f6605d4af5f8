"""`masep serve`: the OpenAI-compatible server over any strategy and plan that `masep run` accepts.

This process is the front end (scheduler, HTTP, tokenizer); with a distributed plan the model
ranks are separate processes it starts and drives over the control channel. SIGINT/SIGTERM:
uvicorn stops accepting, in-flight requests get `--shutdown-timeout` seconds to finish, then
every unfinished request ends with an explicit "server shutting down" error, the ranks are
stopped and joined (terminated if they do not leave), and the process exits.
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys

log = logging.getLogger("masep.serve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from ..cli import STRATEGIES, STRATEGY_HELP, add_distributed_args, add_kv_args, add_model_args
    from ..logs import add_log_arg
    from ..options import add_config_arg
    add_config_arg(p)
    add_model_args(p)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="single", help=STRATEGY_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: preset or dir)")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests beyond the KV slots; more get 429")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may take to finish after SIGINT/SIGTERM")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="distributed strategies: times the server starts every rank again after a failure the "
                        "plan cannot survive (the requests in flight fail first, naming it)")
    p.add_argument("--join-timeout", type=float, default=300.0,
                   help="separated plans: seconds a replacement for a dead expert rank whose experts no other rank "
                        "holds may take to load its part and join the other ranks, which stay up (0: start every "
                        "rank again instead, as after other failures); if it does not join, every rank is started "
                        "again")
    add_log_arg(p)
    p.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    add_distributed_args(p)
    add_kv_args(p, default_seqs="16")


SWITCH_INTERVAL_S = 2e-4


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..cli import _tokenizer_or_exit, build_plan, check_protection, fault_specs, load_config, run_spec
    from ..launcher import KvSettings, make_executor, scheduler_config
    cfg, source = load_config(args, parser)
    try:
        kv = KvSettings(args.max_model_len or cfg.max_seq_len, args.max_num_seqs, args.gpu_memory_utilization,
                        args.max_num_batched_tokens, args.max_waiting).validate(cfg)
        if args.strategy != "single":
            build_plan(args, cfg)
        if args.max_restarts < 0:
            raise ValueError(f"--max-restarts={args.max_restarts}: must be >= 0")
        if not math.isfinite(args.join_timeout) or args.join_timeout < 0:
            raise ValueError(f"--join-timeout={args.join_timeout}: must be a finite number of seconds >= 0")
        if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout={args.shutdown_timeout}: must be a finite number of seconds >= 0")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port={args.port}: must be in [1, 65535]")
        if args.timeout <= 0:
            raise ValueError(f"--timeout={args.timeout}: must be > 0 seconds")
    except ValueError as err:
        parser.error(str(err))
    tokenizer = _tokenizer_or_exit(source, cfg, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or source.preset or source.path
    run = run_spec(args, cfg, source)
    log.debug("starting %s (%s) on %s", name, args.strategy, args.device)
    check_protection(args, run.plan, parser)
    faults = fault_specs(args, run.plan, parser)
    executor = make_executor(run, kv, single_model=source.build(cfg, args.device) if run.plan is None else None,
                             faults=faults, mirror=args.protection == "mirror", join_timeout_s=args.join_timeout)
    from ..engine.async_engine import AsyncEngine
    # The engine thread releases the GIL while the GPU runs a step and must get it back the
    # moment the step ends; by default the event loop thread (streaming the last step's tokens)
    # may hold it for up to 5 ms first, which a 5 ms decode step cannot afford.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    def restart():  # every rank starts again and loads its part (no fault is injected twice)
        return make_executor(run, kv, mirror=args.protection == "mirror", join_timeout_s=args.join_timeout)

    engine = AsyncEngine(executor, scheduler_config(kv, cfg, tokenizer, args.protection), tokenizer, name,
                         restart if run.plan is not None else None, args.max_restarts)
    try:
        log.info("%d attention unit(s) x %d KV slot(s) of %d positions", executor.num_units,
                 executor.slots_per_unit, kv.max_model_len)
        _serve_http(engine, name, args)
    finally:
        engine.close()
        log.info("stopped")
    return 0


def _serve_http(engine, name: str, args: argparse.Namespace) -> None:
    import uvicorn

    from .api import build_app
    config = uvicorn.Config(build_app(engine, name), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    # uvicorn re-raises the signal that stopped it once it has drained, which would kill this
    # process before the engine fails what is left and stops the ranks; a no-op handler in its
    # place lets cmd_serve finish the shutdown and exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
