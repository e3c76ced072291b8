"""Experiment configs: ml_collections files with ``--config.key=value`` overrides.

The convention of big_vision and the Flax examples: a config is a Python file whose
``get_config(arg=None)`` returns a ``ConfigDict``; ``path.py:arg`` passes ``arg`` (e.g. a size switch).
Overrides are parsed by ``ml_collections.config_flags`` against the types of the config's own fields,
so an unknown key or a value of the wrong type is refused instead of silently ignored.

The project's configs ship inside the package (``tagjax/configs/``; a checkout also shows them as
``configs/``), so a bare name such as ``tiny`` or ``ig940m_1k5_32x8d:8`` works from a checkout and from
an installed wheel alike. A config file of one's own, anywhere, starts from the defaults with
``from tagjax.configs import default``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from tagjax.errors import UserError

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_names() -> list[str]:
    """The names of the configs shipped in ``tagjax/configs/`` (``_``-prefixed helpers excluded)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("[!_]*.py"))


def resolve_path(config: str) -> str:
    """A path to a config file, or the name of a packaged config (``tiny`` -> tagjax/configs/tiny.py).

    A file at the given path wins over a packaged config of the same name; ``:arg`` is kept. The docs
    write ``configs/tiny.py`` (a checkout's link to the packaged configs): elsewhere, e.g. after a
    ``pip install``, that path names the packaged config too.
    """
    path, _, arg = config.partition(":")
    if not Path(path).is_file():
        name = path.removesuffix(".py").removeprefix("configs/")
        candidate = PACKAGED_CONFIGS / (name + ".py")
        if "/" in name or name.startswith("_") or not candidate.is_file():
            raise UserError(
                f"config file {path!r} does not exist: pass a path to a config file, or one of the "
                f"packaged configs: {', '.join(packaged_names())}."
            )
        path = str(candidate)
    return path + (":" + arg if arg else "")


def load(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``config`` (``path.py`` or ``path.py:arg``) and applies ``--config.a.b=value`` overrides."""
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: overrides look like --config.key=value.")
    resolved = resolve_path(config)
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
    except SyntaxError as e:  # not a Python config file (a typo, or the wrong file)
        raise UserError(
            f"config file {resolved.partition(':')[0]!r} is not valid Python (line {e.lineno}: "
            f"{e.msg}); a config is a .py file with get_config()."
        ) from None
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
