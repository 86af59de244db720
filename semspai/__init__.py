"""semspai: any-resolution AI-generated image detection (spectral learning fused with cached CLIP semantics)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("semspai")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
