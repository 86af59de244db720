"""The `semspai` click group: every stage registers its command here."""

from __future__ import annotations

import logging
import sys

import click

from semspai import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="semspai")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """semspai: detect AI-generated images at any resolution (spectral learning + CLIP semantics)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _register() -> None:
    # Each stage module defines one click command (or group); importing here keeps `--help` complete.
    from semspai.stages import demo, shard

    cli.add_command(shard.command)
    cli.add_command(demo.command)
    from semspai.stages import extract, store_tools

    cli.add_command(extract.command)
    cli.add_command(store_tools.group)
    from semspai.stages import train

    cli.add_command(train.command)
    from semspai.stages import evaluate, predict

    cli.add_command(evaluate.command)
    cli.add_command(predict.command)


_register()


def main() -> None:
    cli(prog_name="semspai")
