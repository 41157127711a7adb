"""Peak memory of the hires fix: what a 2x hires request holds beyond one pass at its target size.

Each case runs in a fresh process: load the bundle, run the request once (sessions allocate their arenas), reset
the kernel's peak-RSS counter (/proc/self/clear_refs), run it again and read the peak (VmHWM). Cases: one pass
at the first-pass size, one pass at the target size, and first pass -> target with the latent and (where the
bundle has an upscaler) ESRGAN upscalers. The hires request should peak near the single pass at its target
size: it holds one extra set of latents and one decoded image, not a second model or a batch of them.

    python benchmarks/make_sd15_random.py build/sd15-random
    diffrt export build/sd15-random -o build/sd15-random.bundle --no-validate
    python benchmarks/hires_memory.py build/sd15-random.bundle --size 256 --steps 4
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys


def _status(field: str) -> int:
    """A VmXXX line of /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) // 1024


def run_case(bundle: str, size: int, steps: int, hires: str | None) -> dict:
    from diffrt import Pipeline
    from diffrt.engine.hires import HiresOptions

    pipe = Pipeline.load(bundle, backend="ort-cpu")
    loaded = _status("VmRSS")
    kw = dict(height=size, width=size, num_inference_steps=steps, seed=0, upscale=False, output_type="np")
    if hires:
        kw["hires"] = HiresOptions(scale=2, upscaler=hires)
    pipe("a photo of a cat", **kw)  # first call: arenas grow to this request's shapes
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status("VmRSS")
    out = pipe("a photo of a cat", **kw)
    return {
        "loaded_mib": loaded,
        "before_mib": before,
        "peak_mib": _status("VmHWM"),
        "image": list(out.images[0].shape[:2]),
        "seconds": round(out.timings["total"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--size", type=int, default=256, help="first-pass image side (the target is twice it)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.case:
        size, hires = args.case.split(":")
        print(json.dumps(run_case(args.bundle, int(size), args.steps, hires or None)))
        return
    from diffrt.bundle import load_manifest

    cases = [(args.size, ""), (2 * args.size, ""), (args.size, "latent")]
    if load_manifest(args.bundle).upscaler is not None:
        cases.append((args.size, "esrgan"))
    print(f"{'case':<28} {'loaded':>8} {'before':>8} {'peak':>8} {'peak-before':>12}  image    seconds")
    for size, hires in cases:
        cmd = [sys.executable, __file__, args.bundle, "--steps", str(args.steps), "--case", f"{size}:{hires}"]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        name = f"{size}² one pass" if not hires else f"{size}² -> {2 * size}² hires {hires}"
        print(
            f"{name:<28} {r['loaded_mib']:>7}M {r['before_mib']:>7}M {r['peak_mib']:>7}M "
            f"{r['peak_mib'] - r['before_mib']:>11}M  {r['image'][0]}x{r['image'][1]}  {r['seconds']}"
        )


if __name__ == "__main__":
    main()
