"""Where configs come from: the package's configs by name, a checkout's configs/ link, a user's own file."""

import ast
import os
import re
import sys
import warnings

import pytest

from tagjax import config
from tagjax.errors import UserError


@pytest.mark.parametrize("name", config.packaged_names())
def test_every_packaged_config_loads_by_name_from_anywhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a checkout: only the package can supply it
    cfg = config.load(name)
    if name == "gpu_check":  # the plan of benchmarks/gpu_check.py, not a trainer config
        assert {"plan", "budget_s"} <= set(cfg)
    else:
        assert "model" in cfg and "train" in cfg


def test_packaged_names_are_the_configs_not_the_helpers():
    names = config.packaged_names()
    assert {"default", "tiny", "demo", "ig940m_1k5_32x8d", "transfer_linear"} <= set(names)
    assert not any(n.startswith("_") for n in names)


def test_the_checkout_link_a_name_and_a_path_give_the_same_config(repo_root, monkeypatch):
    link = repo_root / "configs"
    assert link.is_symlink() and os.readlink(link) == os.path.join("tagjax", "configs")
    assert link.resolve() == config.PACKAGED_CONFIGS
    monkeypatch.chdir(repo_root)
    by_name = config.load("tiny").to_dict()
    assert config.load("configs/tiny.py").to_dict() == by_name
    assert config.load(str(config.PACKAGED_CONFIGS / "tiny.py")).to_dict() == by_name
    assert config.load("tiny.py").to_dict() == by_name


def test_a_name_passes_its_arg_to_get_config():
    # The paper configs take the accelerator count: 8,064 images over 8 devices keep batch-norm groups
    # of 24 with 14 micro-batches of 72 per device; 64 devices (not a divisor of 336) cannot, and say so.
    on_8 = config.load("ig940m_1k5_32x8d:8")
    with pytest.warns(UserWarning, match="groups of 21"):
        on_64 = config.load("ig940m_1k5_32x8d:64", ["--config.train.log_every_images=8064"])
    assert on_8.train.batch_size == on_64.train.batch_size == 8064
    assert (on_8.train.grad_accum_steps, on_8.model.bn_group_size) == (14, 24)
    assert (on_64.train.grad_accum_steps, on_64.model.bn_group_size) == (1, 21)
    assert config.load("bench_gpu:resnext101_32x8d").model.name == "resnext101_32x8d"


def test_a_users_config_file_anywhere_imports_the_packaged_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(  # the same name as a packaged config: the file wins
        "from tagjax.configs import tiny\n\n\n"
        "def get_config(arg=None):\n"
        "    c = tiny.get_config()\n"
        "    c.train.batch_size = int(arg or 16)\n"
        "    return c\n"
    )
    path_before = list(sys.path)
    assert config.load("tiny.py").train.batch_size == 16
    assert config.load(str(tmp_path / "tiny.py") + ":48").train.batch_size == 48
    assert config.load("tiny").train.batch_size == 32  # a bare name is the packaged config
    assert sys.path == path_before  # loading a config leaves the import path alone


def test_a_file_that_is_not_python_is_one_line(tmp_path):
    # e.g. --config /etc/passwd
    (tmp_path / "notes.py").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UserError, match=r"is not valid Python \(line 1"):
        config.load(str(tmp_path / "notes.py"))


def test_the_docs_configs_path_names_the_packaged_config_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as after a pip install: no configs/ folder here
    assert config.load("configs/tiny.py").model == config.load("tiny").model
    assert (
        config.load("configs/transfer_finetune.py:tiny").model
        == config.load("transfer_finetune:tiny").model
    )


@pytest.mark.parametrize(
    "given", ["no_such_config", "_paper", "configs/_paper.py", "configs/x/tiny.py", "other/tiny"]
)
def test_an_unknown_config_names_the_packaged_ones(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="does not exist") as e:
        config.load(given)
    message = str(e.value)
    assert "\n" not in message and "tiny, transfer_finetune, transfer_linear" in message


def _docstring_configs(path):
    """The ``--config X`` values in a config file's docstring (placeholders such as NAME skipped)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [c for c in re.findall(r"--config[ =]([^\s`]+)", doc) if not c.isupper()]


def test_every_docstring_command_names_a_config_that_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands must work for an installed package too
    commands = {
        path.name: _docstring_configs(path) for path in sorted(config.PACKAGED_CONFIGS.glob("*.py"))
    }
    assert commands["tiny.py"] == ["tiny"]
    assert "ig940m_1k5_32x8d:64" in commands["ig940m_1k5_32x8d.py"]
    for given in {c for found in commands.values() for c in found}:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            assert "model" in config.load(given), given
        # The one warning a documented command may give: a device count that cannot keep BN groups of 24.
        mine = [w for w in caught if issubclass(w.category, UserWarning)]
        assert all("not the paper's 24" in str(w.message) for w in mine), given
