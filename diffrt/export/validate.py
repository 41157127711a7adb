"""Validate exported graphs against their torch modules in ONNX Runtime (CPU), at two shapes, every output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from diffrt.specs import ComponentSpec

FP32_REL_TOL = 1e-4  # max abs error <= 1e-4 * max(1, max |reference|)
FP16_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Check:
    component: str
    precision: str
    shape: str  # the symbolic dims checked, e.g. "batch=2 latent_height=8 latent_width=4"
    max_abs_error: float
    cosine: float
    finite: bool
    passed: bool

    def row(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.component:<30} {self.precision:<5} {self.shape:<60} {self.max_abs_error:>11.3e} "
            f"{self.cosine:>10.6f}  {verdict}"
        )


HEADER = f"{'component':<30} {'prec':<5} {'shape':<60} {'max abs err':>11} {'cosine':>10}  result"


def validation_dims(spec: ComponentSpec) -> list[dict[str, int]]:
    """The opt shape and one more: non-square where the spec has two spatial dims, else another batch, and the
    longest prompt where the spec takes several text chunks."""
    opt = spec.opt_dims()
    ranges, multiples = spec.dim_ranges, dict(spec.multiples)
    other = dict(opt)
    if "text_chunks" in opt:
        other["text_chunks"] = ranges["text_chunks"].max
    spatial = [d for d in opt if d not in ("batch", "text_chunks")]
    if len(spatial) == 2:
        d = spatial[1]
        step = multiples.get(d, 1)
        lower = (opt[d] // 2) // step * step
        other[d] = lower if lower >= ranges[d].min else opt[d] + step
        if other[d] > ranges[d].max:
            other[d] = opt[d]
    if "batch" in opt:
        other["batch"] = 1 if opt["batch"] > 1 else min(2, ranges["batch"].max)
    return [opt, other] if other != opt else [opt]


def compare(reference: np.ndarray, got: np.ndarray) -> tuple[float, float, bool]:
    finite = bool(np.isfinite(got).all())
    ref, out = reference.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    err = float(np.abs(ref - out).max()) if finite else float("inf")
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(ref @ out / denom) if finite and denom > 0 else (1.0 if finite and not ref.any() else 0.0)
    return err, cosine, finite


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validate_component(module: torch.nn.Module, spec: ComponentSpec, graphs: dict[str, Path]) -> list[Check]:
    """Run torch (FP32) and every graph on the same sample inputs; judge FP32 by error, FP16 by cosine.
    One ONNX Runtime session at a time: with an SD UNet, each holds gigabytes."""
    cases = []
    for seed, dims in enumerate(validation_dims(spec)):
        feeds = spec.sample_inputs(dims, seed=seed)
        with torch.no_grad():
            out = module(*(torch.from_numpy(a) for a in feeds.values()))
        references = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        cases.append((" ".join(f"{k}={v}" for k, v in dims.items()), feeds, references))
    names = [t.name for t in spec.outputs]
    checks = []
    for precision, path in graphs.items():
        sess = session(path)
        for label, feeds, references in cases:
            for name, reference, got in zip(names, references, sess.run(names, feeds)):
                err, cosine, finite = compare(reference, got)
                if precision == "fp32":
                    ok = finite and err <= FP32_REL_TOL * max(1.0, float(np.abs(reference).max()))
                else:
                    ok = finite and cosine >= FP16_MIN_COSINE
                component = spec.name if len(names) == 1 else f"{spec.name}:{name}"
                checks.append(Check(component, precision, label, err, cosine, finite, ok))
    return checks
