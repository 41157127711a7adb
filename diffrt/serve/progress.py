"""What the engine is doing now: the step of the running call, a cheap preview, and interruption.

The engine thread calls `step(i, total)` after every UNet call (the Pipeline's progress callback); the event
loop reads `snapshot()` and calls `interrupt()`. An interrupted call raises `Interrupted` at its next step.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Latent -> RGB in about [-1, 1]: a least-squares fit of each latent space's channels to its decoder's pixels,
# good enough for a thumbnail while sampling (the figures are the widely used "approx cheap" ones).
_RGB = {
    4: np.array(
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32
    ),
}


class Interrupted(Exception):
    """The running request was stopped by an interrupt (POST /sdapi/v1/interrupt or the page's button)."""


def preview(latents: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) thumbnail of the first image's latents (C, h, w)."""
    x = latents[0].astype(np.float32)
    coeffs = _RGB.get(x.shape[0])
    rgb = np.einsum("chw,cr->hwr", x, coeffs) if coeffs is not None else np.repeat(x[:1].transpose(1, 2, 0), 3, 2)
    return (np.clip(rgb / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def preview_png(latents: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(preview(latents)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Snapshot:
    running: bool
    step: int  # UNet calls done in the running call
    total: int
    started: float  # time.time() of the running call's start
    elapsed: float
    interrupted: bool
    latents: np.ndarray | None  # the last sample the UNet saw (VP), for a preview

    @property
    def fraction(self) -> float:
        """Share of the running call's UNet calls done, 0 when nothing runs."""
        return self.step / self.total if self.running and self.total else 0.0

    @property
    def eta(self) -> float:
        """Seconds left in the running call at its pace so far (0 before its first step)."""
        done = self.fraction
        return self.elapsed / done - self.elapsed if done else 0.0


class Progress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running, self._step, self._total, self._started, self._t0 = False, 0, 0, 0.0, 0.0
        self._interrupt = threading.Event()
        self._interrupted = False
        self._source = None  # returns the latest latents of the running Pipeline

    def begin(self, latest=None) -> None:
        """A call starts (engine thread). `latest()` returns the sample the UNet saw last, or None."""
        with self._lock:
            self._running, self._step, self._total = True, 0, 0
            self._started, self._t0, self._source = time.time(), time.perf_counter(), latest
            self._interrupted = False
            self._interrupt.clear()

    def end(self) -> None:
        with self._lock:
            self._running, self._source = False, None

    def step(self, i: int, total: int) -> None:
        """The Pipeline's callback (engine thread): raises Interrupted once an interrupt was asked for."""
        with self._lock:
            self._step, self._total = i + 1, total
        if self._interrupt.is_set():
            with self._lock:
                self._interrupted = True
            raise Interrupted("interrupted")

    def interrupt(self) -> bool:
        """Stop the running call at its next step; False when nothing runs."""
        with self._lock:
            if not self._running:
                return False
        self._interrupt.set()
        return True

    def snapshot(self, with_latents: bool = False) -> Snapshot:
        with self._lock:
            latents = self._source() if (with_latents and self._running and self._source) else None
            elapsed = time.perf_counter() - self._t0 if self._running else 0.0
            return Snapshot(self._running, self._step, self._total, self._started, elapsed, self._interrupted, latents)
