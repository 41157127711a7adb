"""Opt-in smoke test of `diffrt serve --ray`: a local Ray cluster with two replicas at half a CPU each, on the
tiny SD1 bundle. Deselected by default (marker `ray`); run it with

    pytest -m ray tests/serve/test_ray.py

It needs the ray extra (`pip install 'diffrt[ray]'`) and takes a few minutes on a small CPU machine: starting Ray
and two replicas is most of it. Ray is imported inside the test, so collecting this file never imports it.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from diffrt.serve.app import ServeSettings

log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None or importlib.util.find_spec("httpx") is None,
        reason="needs Ray Serve and httpx: pip install 'diffrt[ray,test]'",
    ),
]

REPLICAS, MAX_ONGOING, MAX_QUEUE = 2, 2, 2
ATTEMPTS = 5  # starts of the local cluster (see _start)
FAST = {"num_inference_steps": 2, "scheduler": "euler"}
SLOW = {"num_inference_steps": 20, "scheduler": "euler"}  # long enough that a burst arrives before any answer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def _ray_leftovers(tmp_dir: str) -> list[tuple[int, str]]:
    """Ray processes this test started: its descendants that run Ray's code, or any process naming its Ray temp
    dir (a process whose parent died is no longer a descendant)."""
    rows = _processes()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid, _ in rows:
        children[ppid].append(pid)
    mine, todo = set(), [os.getpid()]
    while todo:
        for child in children[todo.pop()]:
            if child not in mine:
                mine.add(child)
                todo.append(child)
    return [
        (pid, args)
        for pid, _, args in rows
        if tmp_dir in args or (pid in mine and ("/ray/" in args or args.startswith("ray::")))
    ]


def _kill_cluster(tmp_dir: str) -> None:
    """Stop what a failed start left running: the processes that name its temp dir (all this test's own)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [pid for pid, args in _ray_leftovers(tmp_dir) if tmp_dir in args]
        if not left:
            return
        log.info("stopping %d processes of the failed start", len(left))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def _start(settings: ServeSettings, port: int):
    """Start a local cluster and deploy; return the temp dir. Ray's raylet gives its Python agents ~15 s to start
    (a fixed limit), which a machine short of CPU can miss: then the half-started cluster (this test's own
    processes) is stopped and the start retried in a fresh directory."""
    from diffrt.serve import ray_app

    for attempt in range(1, ATTEMPTS + 1):
        # Short on purpose: Ray puts unix sockets under it, and their paths are limited to ~107 bytes.
        tmp_dir = tempfile.mkdtemp(prefix="drt-ray-", dir="/tmp")
        opts = ray_app.RayOptions(replicas=REPLICAS, cpus_per_replica=0.5, max_ongoing=MAX_ONGOING, tmp_dir=tmp_dir)
        try:
            assert ray_app.start(settings, opts, "127.0.0.1", port), "a local cluster must be owned by its driver"
            return tmp_dir
        except Exception as e:
            if attempt == ATTEMPTS or "timed out during startup" not in str(e):
                raise
            log.warning("Ray did not start (%s); retrying", e)
            _kill_cluster(tmp_dir)
    raise AssertionError("unreachable")


async def _post(client, payload: dict) -> tuple[int, dict, str]:
    r = await client.post("/v1/images", json=payload)
    return r.status_code, dict(r.headers), r.text


def test_two_replicas_429_on_burst_and_clean_shutdown(sd1_bundle, monkeypatch):
    import httpx

    from diffrt.serve import ray_app

    # Serve gives a new HTTP proxy 5 s to report ready and kills it after three misses: too short on a machine
    # short of CPU. Ray's processes inherit these from the driver.
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

    port = _free_port()
    settings = ServeSettings(
        bundle=str(sd1_bundle),
        backend="ort-cpu",
        threads=1,
        max_batch=2,
        batch_wait_ms=5,
        max_queue=MAX_QUEUE,
        timeout_s=300,
    )
    t0 = time.perf_counter()
    tmp_dir = _start(settings, port)
    log.info("Ray Serve up with %d replicas in %.1f s", REPLICAS, time.perf_counter() - t0)
    try:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
                assert (await client.get("/readyz")).json()["status"] == "ready"

                # The single-process server's schema and error shape, unchanged.
                code, _, text = await _post(client, {"prompt": "x", "num_inference_steps": "3"})
                assert code == 422 and '"field":"num_inference_steps"' in text
                code, _, text = await _post(client, {"prompt": "x", "width": 65})
                assert code == 422 and '"field":"width"' in text

                # Both replicas answer (the router picks between idle replicas at random).
                seen: set[str] = set()
                for i in range(16):
                    code, headers, _ = await _post(client, {"prompt": f"hello {i}", "seed": i, **FAST})
                    assert code == 200, code
                    seen.add(headers["x-replica-id"])
                    if len(seen) == REPLICAS:
                        break
                assert len(seen) == REPLICAS, f"only replica(s) {seen} answered"
                log.info("replicas answering: %s", sorted(seen))

                # A burst beyond what the deployment admits: the rest is shed by Ray's proxy as 429 + Retry-After.
                burst = REPLICAS * MAX_ONGOING + MAX_QUEUE + 6
                t = time.perf_counter()
                answers = await asyncio.gather(
                    *[_post(client, {"prompt": f"burst {i}", "seed": i, **SLOW}) for i in range(burst)]
                )
                codes = collections.Counter(code for code, _, _ in answers)
                log.info("burst of %d: %s in %.1f s", burst, dict(codes), time.perf_counter() - t)
                assert set(codes) <= {200, 429}, codes
                assert codes[429] >= burst - (REPLICAS * MAX_ONGOING + MAX_QUEUE), codes
                assert codes[200] >= 1, codes
                for code, headers, text in answers:
                    if code == 429:
                        assert headers.get("retry-after") == "1"
                    else:
                        assert text.startswith('{"images":["') and int(headers["x-batch-images"]) >= 1

        asyncio.run(scenario())
    finally:
        t = time.perf_counter()
        ray_app.stop(owned=True)
        log.info("serve.shutdown + ray.shutdown in %.1f s", time.perf_counter() - t)

    # Nothing of the cluster may outlive the shutdown (Ray's processes exit asynchronously: give them a moment).
    deadline, left = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        left = _ray_leftovers(tmp_dir)
        if not left:
            break
        time.sleep(1)
    assert not left, "Ray processes left after shutdown:\n" + "\n".join(f"{pid} {args[:150]}" for pid, args in left)
    log.info("no Ray processes left")
