"""diffrt: Stable-Diffusion-style text-to-image from an engine bundle."""

__version__ = "0.1.0"
