"""Host time per model call of every sampler, outside the model: sampler math plus the denoiser wrapper.

The "network" and the step noise are precomputed arrays, so what is timed is diffrt's NumPy work between UNet
calls at SD 512x512 latent size (B x 4 x 64 x 64, float32), schedule construction included. Median over runs.
Target: <= 0.2 ms per step.

    python benchmarks/sampler_overhead.py [--steps 30] [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from diffrt.bundle import SD_SCHEDULER
from diffrt.engine.samplers import SAMPLERS, run_sampler
from diffrt.engine.schedules import make_schedule

SD1 = SD_SCHEDULER
TARGET_MS = 0.2


def time_sampler(name: str, batch: int, steps: int, runs: int) -> float:
    """Median milliseconds of host work per model call."""
    rng = np.random.default_rng(0)
    shape = (batch, 4, 64, 64)
    start = rng.standard_normal(shape, dtype=np.float32)
    out = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    drawn = rng.standard_normal(shape, dtype=np.float32)

    def eps_fn(x: np.ndarray, t: float) -> np.ndarray:
        return out

    def noise(s: tuple[int, ...]) -> np.ndarray:  # precomputed too: the pipeline's RNG is timed separately
        return drawn

    calls = make_schedule(name, SD1, steps).model_calls
    samples = []
    for _ in range(runs + 2):  # two warm-up runs
        t0 = time.perf_counter()
        run_sampler(name, eps_fn, start, SD1, steps, noise=noise)
        samples.append((time.perf_counter() - t0) * 1000 / calls)
    return statistics.median(samples[2:])


def rng_ms(batch: int, runs: int) -> float:
    """Median milliseconds of one per-step noise draw as the pipeline makes it (PCG64, float32)."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(runs + 2):
        t0 = time.perf_counter()
        rng.standard_normal((batch, 4, 64, 64), dtype=np.float32)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    print(
        f"host ms per model call, median of {args.runs} runs, {args.steps} steps, float32 Bx4x64x64 latents "
        f"(target <= {TARGET_MS} ms)"
    )
    print(f"{'sampler':<22}{'calls':>6}{'B=1':>9}{'B=2':>9}")
    worst = 0.0
    for name in SAMPLERS:
        calls = make_schedule(name, SD1, args.steps).model_calls
        ms = [time_sampler(name, b, args.steps, args.runs) for b in (1, 2)]
        worst = max(worst, *ms)
        print(f"{name:<22}{calls:>6}{ms[0]:>9.3f}{ms[1]:>9.3f}")
    draw = [rng_ms(b, 50) for b in (1, 2)]
    print(
        f"{'+ noise draw':<22}{'':>6}{draw[0]:>9.3f}{draw[1]:>9.3f}  (euler_a, dpmpp_2m_sde_karras, lcm: "
        "one standard_normal per step from the pipeline's generator)"
    )
    print(f"worst {worst:.3f} ms: {'within' if worst <= TARGET_MS else 'over'} the {TARGET_MS} ms target")


if __name__ == "__main__":
    main()
