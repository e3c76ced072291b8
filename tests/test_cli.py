"""The `tagjax` command: subcommands, --help, and one-line errors for bad configs."""

import subprocess
import sys

import pytest

from tagjax import cli, config
from tagjax.errors import UserError


def _tagjax(*args):
    return subprocess.run(
        [sys.executable, "-m", "tagjax.cli", *args], capture_output=True, text=True
    )


def test_help_lists_every_subcommand():
    out = _tagjax("--help")
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert "usage: tagjax " + name in capsys.readouterr().out


def test_config_overrides_are_typed():
    cfg = config.load(
        "configs/tiny.py", ["--config.train.batch_size=64", "--config.data.sampling=uniform"]
    )
    assert cfg.train.batch_size == 64 and cfg.data.sampling == "uniform"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.batch_sise=64", "unknown key 'batch_sise'"),
        ("--config.train.batch_size=many", "invalid literal for int"),
        ("--config.nonexistent=1", "unknown key 'nonexistent'"),
    ],
)
def test_bad_override_is_a_one_line_error(override, message):
    with pytest.raises(UserError, match=message) as e:
        config.load("configs/tiny.py", [override])
    assert "\n" not in str(e.value)


def test_missing_config_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        config.load("configs/no_such_config.py")


def test_only_the_closed_event_loop_noise_of_a_failed_save_is_silenced():
    import types

    from tagjax import cli

    seen = []
    hook = cli._without_closed_loop_noise(seen.append)
    noise = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(noise)
    hook(other)
    assert seen == [other]
