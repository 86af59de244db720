"""The `semspai` click group: every stage registers its command here."""

from __future__ import annotations

import importlib
import logging
import os

import click

from semspai import __version__
from semspai.pipeline.host import tune_malloc
from semspai.pipeline.progress import configure_logging

TUNE_MALLOC = "tune_malloc"  # set in the context object by `main`: this process is the command's own

# command name -> "module:attribute"; imported only when that command runs, so `semspai shard` does not pay
# for importing torch models and open_clip
COMMANDS = {
    "shard": "semspai.stages.shard:command",
    "extract-clip": "semspai.stages.extract:command",
    "store": "semspai.stages.store_tools:group",
    "train": "semspai.stages.train:command",
    "eval": "semspai.stages.evaluate:command",
    "predict": "semspai.stages.predict:command",
    "demo": "semspai.stages.demo:command",
}
# what `semspai --help` lists, without importing every command (seconds of torch imports); each is the first
# sentence of its command's own help (a test holds them equal)
SUMMARIES = {
    "shard": "Pack images (folders with real/fake label folders, or CSV manifests) into WebDataset tars.",
    "extract-clip": "Fill the feature store with CLIP vectors of every image and grid patch; reruns skip done shards.",
    "store": "Inspect, verify and export a feature store; drop shards for extract-clip to redo.",
    "train": "Train the spectral encoder and fusion head; CLIP vectors come from the store, never from CLIP.",
    "eval": "Score a split with one or more checkpoints: metrics per generator, robustness, plots and a report.",
    "predict": "Score images (files, or directories walked recursively) of any size: score = P(fake).",
    "demo": "Make a small synthetic demo set (photos from scikit-image and generator-like re-syntheses of them) and "
    "run every stage on it, offline.",
}


EXIT_INTERRUPTED = 130


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def invoke(self, ctx: click.Context):
        """Run the command; Ctrl-C exits 130 (128 + SIGINT), as shells and job schedulers expect, not click's 1."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nAborted!", err=True)
            ctx.exit(EXIT_INTERRUPTED)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUMMARIES[name]) for name in COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="semspai")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """semspai: detect AI-generated images at any resolution (spectral learning + CLIP semantics)."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    if (ctx.obj or {}).get(TUNE_MALLOC):  # the command's own process; not a caller's (tests, notebooks)
        tune_malloc()
    # Dask's scheduler and nanny narrate every connection at INFO: its warnings only, unless --verbose. Through
    # dask's config too, which `import distributed` applies to its loggers (here and in its worker processes)
    level = "debug" if verbose else "warning"
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", level)
    logging.getLogger("distributed").setLevel(level.upper())


def main() -> None:
    cli(prog_name="semspai", obj={TUNE_MALLOC: True})
