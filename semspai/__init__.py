"""semspai: any-resolution AI-generated image detection (spectral learning fused with cached CLIP semantics)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("semspai")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load_detector"]


def __getattr__(name: str):
    # Lazy: `import semspai` stays light (no torch, no open_clip) until the detector is asked for.
    if name == "load_detector":
        from semspai.pipeline.inference import load_detector

        return load_detector
    raise AttributeError(f"module 'semspai' has no attribute {name!r}")
