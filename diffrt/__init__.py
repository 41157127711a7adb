"""diffrt: Stable-Diffusion-style text-to-image from an engine bundle."""

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineOutput", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import diffrt` (and the export half) does not load onnxruntime until the runtime is used.
    if name in ("Pipeline", "PipelineOutput"):
        from diffrt.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
