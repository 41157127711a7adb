"""`diffrt serve BUNDLE`: the HTTP server. The parser imports nothing heavy, so `diffrt --help` stays fast and
the serve extra (fastapi, uvicorn) is needed only to run it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffrt.errors import BadInput

log = logging.getLogger(__name__)


# Ray-only options (flag, type, metavar, help); None when not given, so they can be refused without --ray.
RAY_OPTIONS = (
    ("--replicas", int, "N", "replicas (default 1); with --min/--max-replicas the initial count"),
    ("--gpus-per-replica", float, "G", "GPUs per replica (default 1, 0 with --backend ort-cpu); 0.5: two share one"),
    ("--cpus-per-replica", float, "C", "CPUs Ray reserves per replica (default 1)"),
    ("--min-replicas", int, "N", "autoscaling lower bound (turns autoscaling on)"),
    ("--max-replicas", int, "N", "autoscaling upper bound (turns autoscaling on)"),
    ("--max-ongoing", int, "N", "requests one replica holds at once (default 2 x --max-batch)"),
    ("--ray-address", str, "ADDRESS", "join this Ray cluster (auto, HOST:PORT, ray://HOST:10001), do not start one"),
    ("--ray-tmp-dir", str, "DIR", "temporary directory of the local Ray cluster (default: Ray's own)"),
)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="HTTP server: diffrt's, OpenAI's Images and A1111's APIs",
        description="Serve a bundle over HTTP with an in-process micro-batcher (one process, one Pipeline).",
    )
    p.add_argument("bundle", help="bundle directory (the default model)")
    p.add_argument("others", nargs="*", metavar="BUNDLE", help="more bundles, picked per request by name")
    p.add_argument("--max-loaded", type=int, default=1, help="bundles kept loaded at once (default 1; LRU)")
    p.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY (or Basic, KEY as password)")
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
    p.add_argument("--refiner", metavar="BUNDLE", help="SDXL: a refiner bundle that finishes every schedule")
    from diffrt.cli import add_embedding_flags, add_lora_flags  # the generate command's flags, the same words

    add_embedding_flags(p)
    add_lora_flags(p, files=False)
    r = p.add_argument_group("scale-out with Ray Serve (needs the ray extra; see docs/serving.md)")
    r.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment, one replica per GPU")
    for flag, kind, metavar, meaning in RAY_OPTIONS:
        r.add_argument(flag, type=kind, default=None, metavar=metavar, help=meaning)
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
        others=tuple(args.others),
        max_loaded=args.max_loaded,
        api_key=args.api_key or None,
        backend=args.backend,
        threads=args.threads,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        refiner=args.refiner,
        embeddings=str(args.embeddings) if args.embeddings else None,
        allow_pickle=args.allow_pickle,
        lora_dir=str(args.lora_dir) if args.lora_dir else None,
    )
    if args.lora_dir and not args.lora_dir.is_dir():
        raise BadInput(f"--lora-dir {args.lora_dir} is not a folder")
    given = [flag for flag, *_ in RAY_OPTIONS if getattr(args, _dest(flag)) is not None]
    if args.others and args.refiner:
        raise BadInput("--refiner works with one bundle; serve the others from a second server")
    if args.ray:
        if args.others or args.api_key:
            raise BadInput("--ray serves one bundle without --api-key; drop the extra bundles or --ray")
        return _serve_with_ray(args, settings)
    if given:
        raise BadInput(f"{given[0]} needs --ray")
    app = create_app(settings)
    log.info("serving %s on http://%s:%d (docs at /docs)", args.bundle, args.host, args.port)
    # One worker process: the Pipeline and its batcher live in this process; scale out with more processes
    # (or machines) behind a balancer, not with uvicorn workers sharing one device.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _serve_with_ray(args: argparse.Namespace, settings) -> int:
    # Imported here only: `diffrt serve` without --ray must never import ray.
    try:
        from diffrt.serve import ray_app
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "ray":
            raise BadInput(f"--ray needs Ray Serve 2.58 or newer ({e}): pip install 'diffrt[ray]'") from None
        raise
    opts = ray_app.RayOptions(
        replicas=args.replicas if args.replicas is not None else 1,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica if args.cpus_per_replica is not None else 1.0,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        max_ongoing=args.max_ongoing or 0,
        address=args.ray_address,
        tmp_dir=args.ray_tmp_dir,
    )
    ray_app.check(settings, opts)
    # Replicas do not share the driver's working directory: hand them an absolute path. On a cluster the
    # bundle must exist at that path on every node; a local cluster's bundle is checked here, in one line.
    bundle = Path(args.bundle)
    if bundle.exists() or not opts.address:
        from diffrt.bundle import load_manifest

        load_manifest(bundle)
        settings.bundle = str(bundle.resolve())
    return ray_app.run(settings, opts, args.host, args.port)


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
