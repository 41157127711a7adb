"""diffrt against diffusers (torch) and optimum-onnx (ONNX Runtime) on the same weights, interleaved.

    python benchmarks/compare.py CHECKPOINT_DIR BUNDLE_DIR --steps 20 --size 64x64 --runs 10 [--json FILE]
                                 [--job txt2img|img2img|inpaint] [--strength 0.6] [--base-src CHECKOUT]

Each implementation runs in its own worker process (benchmarks/peer.py); after every worker has loaded
and done its warm-up runs, the timed runs go round robin (A B C A B C ...) so that the machine's noise hits
all of them alike. Reported: each median and p90 end to end, the time inside model calls, and ratios.
optimum needs its own virtual environment (`make optimum-venv`); it is skipped when that is missing, and for
image jobs (it is timed on text to image only). `--base-src` adds a "diffrt-base" peer importing diffrt from
another checkout (with its own bundle, `--base-bundle`, when the bundle format changed): before/after numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = {
    "diffrt": ROOT / ".venv/bin/python",
    "diffusers": ROOT / ".venv/bin/python",
    "optimum": ROOT / ".venv-optimum/bin/python",
    "diffrt-base": ROOT / ".venv/bin/python",
}


class Worker:
    def __init__(self, kind: str, args: argparse.Namespace):
        base = kind == "diffrt-base"
        cmd = [
            str(PYTHONS[kind]),
            str(ROOT / "benchmarks/peer.py"),
            "diffrt" if base else kind,
            "--checkpoint",
            str(args.checkpoint),
            "--bundle",
            str(args.base_bundle or args.bundle) if base else str(args.bundle),
            "--steps",
            str(args.steps),
            "--size",
            args.size,
            "--optimum-dir",
            str(args.optimum_dir),
            "--job",
            args.job,
            "--strength",
            str(args.strength),
            *(["--src", str(args.base_src)] if base else []),
        ]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.load_s = self._read()["ready"]
        self.totals: list[float] = []
        self.calls: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, record: bool = True) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self._read()
        if record:
            self.totals.append(r["total"])
            self.calls.append(r["model_calls"])

    def close(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = self._read()["peak_rss_mb"]
        self.proc.wait()
        return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="diffusers folder (what diffusers and optimum load)")
    p.add_argument("bundle", type=Path, help="diffrt bundle exported from the same folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default="64x64")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peers", default="diffrt,diffusers,optimum")
    p.add_argument("--optimum-dir", type=Path, help="where optimum's own export is kept (default: beside bundle)")
    p.add_argument("--json", type=Path)
    p.add_argument("--job", choices=["txt2img", "img2img", "inpaint"], default="txt2img")
    p.add_argument("--strength", type=float, default=0.6, help="image jobs")
    p.add_argument("--base-src", type=Path, help='add a "diffrt-base" peer: diffrt imported from this checkout')
    p.add_argument("--base-bundle", type=Path, help="the diffrt-base peer's bundle (default: BUNDLE)")
    args = p.parse_args()
    args.optimum_dir = args.optimum_dir or args.bundle.with_name(args.bundle.name + ".optimum")
    kinds = args.peers.split(",") + (["diffrt-base"] if args.base_src else [])
    if "optimum" in kinds and (args.job != "txt2img" or not PYTHONS["optimum"].exists()):
        kinds.remove("optimum")
        why = "it runs text to image only" if args.job != "txt2img" else "no .venv-optimum (make optimum-venv)"
        print(f"optimum skipped: {why}", file=sys.stderr)
    workers = [Worker(k, args) for k in kinds]
    for w in workers:
        for _ in range(args.warmup):
            w.run(record=False)
    for _ in range(args.runs):
        for w in workers:
            w.run()
    peaks = {w.kind: w.close() for w in workers}
    report = {
        "settings": vars(args)
        | {
            "checkpoint": str(args.checkpoint),
            "bundle": str(args.bundle),
            "optimum_dir": str(args.optimum_dir),
            "json": None,
        },
        "peers": {},
    }
    base = float(np.median(workers[0].totals))
    print(
        f"{args.job} {args.size}, {args.steps} steps"
        + (f", strength {args.strength:g}" if args.job != "txt2img" else "")
        + f", guidance 7.5, DPM++ 2M, {args.runs} interleaved runs "
        f"(+{args.warmup} warm-up each)"
    )
    print(
        f"{'peer':<12}{'median ms':>11}{'p90 ms':>9}{'in models ms':>14}{'load s':>8}{'peak RSS MB':>13}"
        f"{'diffrt is':>12}"
    )
    for w in workers:
        med = float(np.median(w.totals))
        calls = float(np.median(w.calls)) if not np.isnan(w.calls).all() else float("nan")
        entry = {
            "median_ms": med * 1000,
            "p90_ms": float(np.percentile(w.totals, 90)) * 1000,
            "model_calls_median_ms": calls * 1000,
            "load_s": w.load_s,
            "peak_rss_mb": peaks[w.kind],
            "speedup_of_diffrt": med / base,
            "totals_s": w.totals,
        }
        report["peers"][w.kind] = entry
        print(
            f"{w.kind:<12}{entry['median_ms']:>11.1f}{entry['p90_ms']:>9.1f}{entry['model_calls_median_ms']:>14.1f}"
            f"{w.load_s:>8.2f}{peaks[w.kind]:>13.0f}{med / base:>11.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
