"""Experiment configs: ml_collections files with ``--config.key=value`` overrides.

The convention of big_vision and the Flax examples: a config is a Python file under ``configs/`` whose
``get_config(arg=None)`` returns a ``ConfigDict``; ``path.py:arg`` passes ``arg`` (e.g. a size switch).
Overrides are parsed by ``ml_collections.config_flags`` against the types of the config's own fields,
so an unknown key or a value of the wrong type is refused instead of silently ignored.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from tagjax.errors import UserError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolve_path(config: str) -> str:
    """Accepts a path, or a bare name of a file in the repository's configs/ (``tiny`` -> configs/tiny.py)."""
    path, _, arg = config.partition(":")
    if not Path(path).is_file():
        candidate = REPO_CONFIGS / (path if path.endswith(".py") else path + ".py")
        if candidate.is_file():
            path = str(candidate)
        else:
            raise UserError(
                f"config file {path!r} does not exist (pass a path, or a name in configs/)."
            )
    return path + (":" + arg if arg else "")


def load(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``config`` (``path.py`` or ``path.py:arg``) and applies ``--config.a.b=value`` overrides."""
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: overrides look like --config.key=value.")
    resolved = resolve_path(config)
    # Configs import their shared default as `configs.default`: make the folder holding configs/ importable.
    configs_parent = str(Path(resolved.partition(":")[0]).resolve().parent.parent)
    if configs_parent not in sys.path:
        sys.path.insert(0, configs_parent)
    argv = ["tagjax", f"--config={resolved}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        flag_values(argv)
        cfg = flag_values.config
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        # config_flags reports an unknown key as AttributeError(KeyError(message)).
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        if isinstance(e, KeyError):
            message = "unknown key " + " ".join(str(e.args[0]).split())
        else:
            message = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"bad config or override: {message}") from None
    if cfg is None:
        raise UserError(f"config file {config!r} returned no config from get_config().")
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (saved beside checkpoints so a run says what it was)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; a library entry point must make sure they are parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
