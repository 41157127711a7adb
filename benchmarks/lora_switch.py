"""What a LoRA switch costs at run time, against loading the bundle: ONNX Runtime CPU.

Builds two kohya LoRAs (UNet attention, feed-forward and resnet convolutions, and the text encoder) for the
diffusers folder the bundle was exported from, then on one Pipeline, in rounds:
none -> A, A -> B, B -> A, A -> none. The first round reads and merges each file (then new sessions); later
rounds find the merged weights cached (new sessions only). Reports the first round and the median of the later
ones, the bundle's load time measured in the same run, the merged bytes each cached LoRA set holds and the
process's RSS growth.

    python benchmarks/lora_switch.py build/sd15-random build/sd15-random.bundle --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the diffusers folder the bundle was exported from (for the LoRAs)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the LoRA builder of the tests
    from diffrt import Pipeline
    from tests.builders.lora import build_lora

    tmp = Path(tempfile.mkdtemp(prefix="loras-"))
    a = build_lora(tmp / "a.safetensors", args.folder, "kohya", seed=1, rank=args.rank, size=0.02)
    b = build_lora(tmp / "b.safetensors", args.folder, "kohya", seed=2, rank=args.rank, size=0.02)
    print(f"LoRA files: {a.stat().st_size / 1e6:.1f} MB each (rank {args.rank})")
    gc.collect()

    loads, pipe = [], None
    for _ in range(2):
        del pipe
        gc.collect()
        start = time.perf_counter()
        pipe = Pipeline.load(args.bundle, backend="ort-cpu", threads=args.threads)
        loads.append(time.perf_counter() - start)
    base_rss = rss_mb()
    sequence = [("none -> A", [(a, 1.0)]), ("A -> B", [(b, 1.0)]), ("B -> A", [(a, 1.0)]), ("A -> none", [])]
    times: dict[str, list[float]] = {name: [] for name, _ in sequence}
    for _ in range(args.rounds):
        for name, loras in sequence:
            times[name].append(pipe.use_loras(loras))
    held = {k: sum(w.nbytes for c in merged.values() for w in c.values()) for k, merged in pipe._lora_sets.items()}
    print(f"bundle load (ort-cpu): {statistics.median(loads):.2f} s (runs {', '.join(f'{x:.2f}' for x in loads)})")
    print("switch (Pipeline.use_loras): the first round reads and merges A and B; later rounds find them cached")
    print(f"{'switch':<14}{'first s':>9}{'later median s':>16}   later runs")
    for name, values in times.items():
        later = values[1:] or values
        print(f"{name:<14}{values[0]:>9.2f}{statistics.median(later):>16.2f}   {', '.join(f'{v:.2f}' for v in later)}")
    for key, nbytes in held.items():
        label = "+".join(Path(f).stem for f, *_ in key) or "none"
        print(f"cached set {label}: {nbytes / 1e6:.0f} MB of merged weights")
    print(f"RSS: {base_rss:.0f} MB after load, {rss_mb():.0f} MB after the switches")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
