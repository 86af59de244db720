"""What every CLI stage shares: config options, and turning known errors into one-line exits."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import click

from semspai.pipeline.config import ConfigError
from semspai.store.checkpoints import CheckpointError
from semspai.store.images import ImageDecodeError
from semspai.store.manifest import StaleOutputError
from semspai.store.shards import ShardError

# Errors that mean "bad input": reported as one line, exit code 1, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ShardError,
    StaleOutputError,
    ImageDecodeError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
)
# ...and these, named as "module:Class" so that no stage imports torch or zarr to say so (`semspai train --help`
# answers at once); an exception of a class whose module is not imported cannot have been raised
LAZY_USER_ERRORS = (
    "semspai.pipeline.clip:ClipLoadError",
    "semspai.pipeline.data:DataError",
    "semspai.pipeline.engine:TrainingDiverged",
    "semspai.pipeline.perturb:PerturbError",
    "semspai.pipeline.spectral:EncoderConfigError",
    "semspai.store.features:FeatureStoreError",
    "semspai.store.sources:SourceError",
    "semspai.store.writer:WriterProcessError",
)


def refuse_foreign_output(path: Path, is_ours: Callable[[Path], bool], what: str, hint: str = "") -> None:
    """An output file may replace an earlier one of its own kind (`is_ours`), nothing else: not an input image,
    a tar or someone's notes given as the output by a slip."""
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder: give the path of a file for {what}")
    if path.exists() and not path.is_file():  # /dev/stdout, a pipe: reading it to check would wait for ever, and
        # the output is written beside it and renamed over it (atomic_write), which a device or a pipe cannot take
        raise FileExistsError(f"{path} is not a regular file (a device or a pipe?): the output is written to a "
                              "file; give a file's path" + (f" ({hint})" if hint else ""))  # fmt: skip
    if path.exists() and not is_ours(path):
        raise FileExistsError(f"{path} exists and is not {what}; it is left as it is: remove it or choose another path")


def user_error_types() -> tuple[type[BaseException], ...]:
    """USER_ERRORS and those of LAZY_USER_ERRORS whose modules are imported."""
    lazy = []
    for ref in LAZY_USER_ERRORS:
        module, name = ref.split(":")
        if module in sys.modules:
            lazy.append(getattr(sys.modules[module], name))
    return USER_ERRORS + tuple(lazy)


def user_errors(fn: Callable) -> Callable:
    """Report bad-input errors as `Error: <one line>` and exit non-zero instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, user_error_types()):
                raise
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc

    return wrapper


def config_options(fn: Callable) -> Callable:
    """`--config FILE` and repeatable `--set KEY=VALUE`."""
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one config key, e.g. --set TRAIN.EPOCHS=5 (repeatable; values are YAML).",
    )(fn)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML run config (unknown keys are errors).",
    )(fn)


def resolve_device(device: str) -> str:
    """`auto` -> the first GPU when there is one, else the CPU; anything else as given, once it is known to
    exist here (a ConfigError naming `--device` otherwise, before any model is built). Decided once, here."""
    import torch  # here, not at the top: `semspai shard` should not pay for importing torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} here "
                f"({'a CPU-only build' if torch.version.cuda is None else 'no driver or no device'}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "meta":  # torch's shape-only device: no model could run on it
        raise ConfigError(f"--device {device}: the meta device holds no data; use cpu, cuda or auto")
    elif dev.type != "cpu":
        modules = (getattr(torch.backends, dev.type, None), getattr(torch, dev.type, None))  # mps, xpu, ...
        if not any(callable(getattr(m, "is_available", None)) and m.is_available() for m in modules):
            raise ConfigError(f"--device {device}: no {dev.type} device is available here; use cpu, cuda or auto")
    return device
