"""Prompt accuracy of a scene model: generate the prompt suite, read each picture back, count what is right.

Used by the tests (diffrt against diffusers on the same checkpoint and starting latents) and by
benchmarks/demo_accuracy.py. NumPy only; the image generator is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffrt.demo.scenes import Reading, Scene, analyse, held_out, prompt_suite

# (prompt, starting latents (1, 4, 8, 8)) -> (H, W, 3) image, float in [0, 1] or uint8
Generate = Callable[[str, np.ndarray], np.ndarray]
SEEDS = (0, 1)  # each prompt is drawn from two starting points


def start_latents(seed: int) -> np.ndarray:
    """Unit-variance starting noise for one image, the same for every implementation."""
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


@dataclass(frozen=True)
class Result:
    scene: Scene
    prompt: str
    seed: int
    reading: Reading

    @property
    def background_ok(self) -> bool:
        return self.reading.background == self.scene.background

    @property
    def colour_ok(self) -> bool:
        return self.reading.colour == self.scene.colour

    @property
    def position_ok(self) -> bool | None:
        return None if self.scene.position is None else self.reading.position_matches(self.scene.position)


def run_suite(generate: Generate, scenes: list[Scene] | None = None, seeds=SEEDS) -> list[Result]:
    results = []
    for scene in scenes or prompt_suite():
        prompt = scene.caption()
        for seed in seeds:
            image = np.asarray(generate(prompt, start_latents(seed)))
            if image.dtype != np.uint8:
                image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
            results.append(Result(scene, prompt, seed, analyse(image)))
    return results


def summary(results: list[Result]) -> dict[str, float]:
    """Shares right: background, object colour, named side, shape; over all prompts and the unseen ones."""
    named = [r for r in results if r.position_ok is not None]
    unseen = [r for r in results if held_out(r.scene.colour, r.scene.shape, r.scene.background)]
    return {
        "images": len(results),
        "background": float(np.mean([r.background_ok for r in results])),
        "colour": float(np.mean([r.colour_ok for r in results])),
        "position": float(np.mean([r.position_ok for r in named])) if named else float("nan"),
        "shape": float(np.mean([r.reading.shape == r.scene.shape for r in results])),
        "unseen_colour": float(np.mean([r.background_ok and r.colour_ok for r in unseen])) if unseen else float("nan"),
    }


def format_summary(name: str, s: dict[str, float]) -> str:
    return (
        f"{name:10s} images {s['images']:3d}  background {s['background']:6.1%}  colour {s['colour']:6.1%}  "
        f"side {s['position']:6.1%}  shape {s['shape']:6.1%}  unseen triples (both colours) {s['unseen_colour']:6.1%}"
    )
