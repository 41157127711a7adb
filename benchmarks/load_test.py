"""Bounded load test for `diffrt serve` on loopback: N concurrent clients for T seconds, then a report.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 64 --seconds 30

Every client loops: POST /v1/images, wait for the answer, repeat, until the time is up; then in-flight requests
finish (bounded by --request-timeout) and the script prints status counts, p50/p99 latency of 200s, images/s
and the server's batch-size histogram from /metrics. Exit status 1 if any 5xx or transport error happened.
Only 127.0.0.1 / localhost / ::1 are accepted: this is not a tool for loading other people's servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx

log = logging.getLogger("load_test")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def batch_histogram(metrics_text: str) -> dict[str, float]:
    """Cumulative `diffrt_batch_images_bucket{le=...}` counts -> images-per-call buckets with their counts."""
    cumulative = []
    for line in metrics_text.splitlines():
        if line.startswith("diffrt_batch_images_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            cumulative.append((le, float(line.rsplit(" ", 1)[1])))
    out, prev = {}, 0.0
    for le, count in cumulative:
        if count - prev:
            out[f"<={le}"] = count - prev
        prev = count
    return out


async def client_loop(
    client: httpx.AsyncClient,
    body: dict,
    stop_at: float,
    statuses: Counter,
    latencies: list[float],
    images: list[int],
    rnd: random.Random,
) -> None:
    while time.monotonic() < stop_at:
        payload = {**body, "seed": rnd.randrange(2**31), "prompt": f"{body['prompt']} #{rnd.randrange(10**6)}"}
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/images", json=payload)
        except httpx.HTTPError as e:
            statuses[f"error:{type(e).__name__}"] += 1
            continue
        statuses[str(r.status_code)] += 1
        if r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
            images.append(len(r.json()["images"]))
        elif r.status_code == 429:
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))  # honour back-pressure


async def run(args: argparse.Namespace) -> int:
    body = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
    }
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.request_timeout, limits=limits) as client:
        ready = await client.get("/readyz")
        if ready.status_code != 200:
            log.error("server not ready: %s %s", ready.status_code, ready.text)
            return 2
        before = batch_histogram((await client.get("/metrics")).text)
        statuses: Counter = Counter()
        latencies: list[float] = []
        images: list[int] = []
        start = time.monotonic()
        stop_at = start + args.seconds
        await asyncio.gather(
            *(
                client_loop(client, body, stop_at, statuses, latencies, images, random.Random(i))
                for i in range(args.clients)
            )
        )
        elapsed = time.monotonic() - start
        after = batch_histogram((await client.get("/metrics")).text)
    hist = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    sent = sum(statuses.values())
    report = {
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "requests": sent,
        "statuses": dict(statuses),
        "admitted_and_answered": statuses.get("200", 0),
        "p50_s": round(percentile(latencies, 50), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "images_per_s": round(sum(images) / elapsed, 2),
        "server_batch_images": hist,
    }
    print(json.dumps(report, indent=2))
    bad = {k: v for k, v in statuses.items() if k.startswith(("5", "error"))}
    if bad:
        log.error("server errors or lost requests: %s", bad)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--prompt", default="a lighthouse at dusk")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=120.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error("--url must point at this machine (127.0.0.1, localhost or ::1)")
    if args.clients < 1 or not 0 < args.seconds <= 3600:
        p.error("--clients must be >= 1 and --seconds in (0, 3600]")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
