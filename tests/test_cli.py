"""The `semspai` CLI: version, `--help` of every command (found by walking the group), one-line errors."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from semspai import __version__
from semspai.stages.cli import EXIT_INTERRUPTED, cli
from semspai.store.shards import read_index
from tests.conftest import write_image


def walk(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under `group`, subcommands included, so commands added later are covered too."""
    found = []
    ctx = click.Context(group)
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        found.append((*path, name))
        if isinstance(cmd, click.Group):
            found += walk(cmd, (*path, name))
    return found


COMMANDS = walk(cli)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="semspai")


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"semspai, version {__version__}"


def test_the_known_stages_are_registered():
    assert {("shard",), ("extract-clip",), ("store", "info"), ("train",), ("eval",), ("predict",), ("demo",)} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_group_help_lists_every_command(flag):
    result = invoke(flag)
    assert result.exit_code == 0
    assert "Usage: semspai" in result.output
    for name in cli.list_commands(click.Context(cli)):
        assert name in result.output


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_help_of_every_command(path):
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert f"Usage: semspai {' '.join(path)}" in result.output
    assert "Options:" in result.output and "--help" in result.output


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_unknown_option_is_a_one_line_error(path):
    assert_one_line_error(invoke(*path, "--no-such-option"), "No such option")


def test_unknown_command():
    assert_one_line_error(invoke("no-such-command"), "No such command")


def test_shard_missing_out(tmp_path):
    assert_one_line_error(invoke("shard", str(tmp_path)), "--out")


def test_shard_bad_inputs_are_one_line_errors(tmp_path):
    out = str(tmp_path / "out")
    assert_one_line_error(invoke("shard", str(tmp_path / "nope"), "--out", out), "does not exist")
    assert_one_line_error(invoke("shard", str(tmp_path), "--out", out, "--split", "1,2"), "--split")
    (tmp_path / "data" / "misc").mkdir(parents=True)
    write_image(tmp_path / "data" / "misc" / "x.png", 20, 20, seed=0)
    assert_one_line_error(invoke("shard", str(tmp_path / "data"), "--out", out), "x.png", "--skip-unlabeled")
    (tmp_path / "bad.csv").write_text("path,label\nx.png,perhaps\n")
    assert_one_line_error(invoke("shard", str(tmp_path / "bad.csv"), "--out", out), "bad.csv:2", "perhaps")
    assert_one_line_error(invoke("shard", str(tmp_path / "data"), "--out", out, "--shard-size", "ten"), "--shard-size")


def test_shard_runs_then_is_up_to_date_then_stale(image_tree, tmp_path):
    out = str(tmp_path / "out")
    first = invoke("shard", str(image_tree), "--out", out, "--shard-size", "5", "--workers", "2")
    assert first.exit_code == 0, first.output
    assert f"16 images in {len(read_index(out)['shards'])} shards at {out}" in first.output
    assert "labels: fake=8, real=8" in first.output

    again = invoke("shard", str(image_tree), "--out", out, "--shard-size", "5")
    assert again.exit_code == 0 and "up to date" in again.output

    stale = invoke("shard", str(image_tree), "--out", out, "--shard-size", "6")
    assert_one_line_error(stale, "stale", "another configuration", "--force")

    forced = invoke("shard", str(image_tree), "--out", out, "--shard-size", "6", "--force")
    assert forced.exit_code == 0 and "16 images" in forced.output


def test_shard_reports_skipped_files(image_tree, tmp_path):
    (image_tree / "real" / "camera" / "empty.png").write_bytes(b"")
    result = invoke("shard", str(image_tree), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable, 0 duplicate, 0 unlabeled" in result.output


def test_shard_with_nothing_readable_fails(tmp_path):
    (tmp_path / "data" / "real" / "cam").mkdir(parents=True)
    (tmp_path / "data" / "real" / "cam" / "x.png").write_bytes(b"")
    assert_one_line_error(invoke("shard", str(tmp_path / "data"), "--out", str(tmp_path / "out")), "no image")


def test_ctrl_c_exits_130(monkeypatch):
    """An interrupt ends a command with 128 + SIGINT, as shells and job schedulers expect."""
    from semspai.stages import shard

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard, "run", interrupted)
    result = CliRunner().invoke(cli, ["shard", ".", "--out", "x"])
    assert result.exit_code == EXIT_INTERRUPTED == 130 and "Aborted!" in result.output


def test_top_level_help_lists_every_command_by_its_own_first_sentence():
    """`semspai --help` lists the commands without importing them; each line is its command's own summary."""
    from semspai.stages.cli import COMMANDS, SUMMARIES

    assert list(SUMMARIES) == list(COMMANDS)
    for name in COMMANDS:
        command = cli.get_command(click.Context(cli), name)
        own = " ".join(command.help.split())
        assert own.startswith(SUMMARIES[name]), name
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    assert all(SUMMARIES[name] in " ".join(res.output.split()) for name in COMMANDS)
    for name, summary in SUMMARIES.items():  # a whole first sentence, not a cut one
        assert summary.endswith("."), name


def test_top_level_help_imports_no_command():
    """`semspai --help` is quick: listing the commands imports none of them (nor torch)."""
    code = (
        "import sys\nfrom semspai.stages.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m in ('torch', 'open_clip', 'zarr') or m.startswith('semspai.stages.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['semspai.stages.cli']"


HEAVY = ("torch", "open_clip", "sklearn", "matplotlib", "distributed")


def test_every_commands_help_answers_without_importing_torch():
    """`semspai predict --help` (or a usage error) is quick: no command imports torch, CLIP, scikit-learn,
    matplotlib or Dask before it runs; each is checked in turn, so the first one that does is named."""
    code = (
        "import sys\nfrom semspai.stages.cli import cli\n"
        f"heavy = {HEAVY!r}\n"
        f"for path in {[list(p) for p in COMMANDS]!r}:\n"
        "    try:\n        cli([*path, '--help'])\n    except SystemExit:\n        pass\n"
        "    print(' '.join(path), '->', sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line for line in res.stderr.splitlines() if " -> " in line]
    assert len(lines) == len(COMMANDS) and all(line.endswith(" -> []") for line in lines), res.stderr


def test_the_user_error_types_named_lazily_are_exception_classes():
    import importlib

    from semspai.stages.common import LAZY_USER_ERRORS

    for ref in LAZY_USER_ERRORS:
        module, name = ref.split(":")
        assert issubclass(getattr(importlib.import_module(module), name), Exception), ref
