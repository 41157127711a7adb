"""`diffrt serve BUNDLE`: the HTTP server. The parser imports nothing heavy, so `diffrt --help` stays fast and
the serve extra (fastapi, uvicorn) is needed only to run it."""

from __future__ import annotations

import argparse
import logging
import sys

from diffrt.errors import BadInput

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="HTTP server: POST /v1/images, /healthz, /readyz, /metrics",
        description="Serve a bundle over HTTP with an in-process micro-batcher (one process, one Pipeline).",
    )
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4, help="images per engine call (capped by the bundle)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long the oldest queued request waits for compatible partners",
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for the engine; more get 429")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request limit, queue included; then 504")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, ort-cuda or ort-cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for ort-cpu (default: all cores)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from diffrt.serve.app import ServeSettings, create_app
    except ImportError as e:
        raise BadInput(f"serving needs the serve extra ({e.name} is missing): pip install 'diffrt[serve]'") from None
    for name, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 1),
        ("--port", args.port, 0),
    ):
        if value < low:
            raise BadInput(f"{name} must be >= {low}, got {value}")
    if args.batch_wait_ms < 0 or args.timeout_s <= 0:
        raise BadInput("--batch-wait-ms must be >= 0 and --timeout-s > 0")
    settings = ServeSettings(
        bundle=args.bundle,
        backend=args.backend,
        threads=args.threads,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
    )
    app = create_app(settings)
    log.info("serving %s on http://%s:%d (docs at /docs)", args.bundle, args.host, args.port)
    # One worker process: the Pipeline and its batcher live in this process; scale out with more processes
    # (or machines) behind a balancer, not with uvicorn workers sharing one device.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m diffrt.serve.cli BUNDLE ...` (same options as `diffrt serve`)."""
    parser = argparse.ArgumentParser(prog="diffrt-serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except BadInput as e:
        log.error("diffrt serve: error: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
