"""The notebooks in colabs/ run top to bottom on a CPU, and show the plots and tables they promise.

They are executed by nbclient with a python3 kernel of this environment (the same interpreter), in order,
sharing one work directory as a user's runs would: 01 builds the demo dataset, 02 trains on it, 03 uses
02's checkpoint. The notebooks are stored without outputs; this is where they get run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = [
    "01_vocabulary_and_dataset.ipynb",
    "02_train_tiny_model.ipynb",
    "03_checkpoint_predict_probe.ipynb",
]


def _outputs(nb, mime: str) -> list[str]:
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if mime in data:
                found.append(data[mime])
    return found


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _tables(nb) -> list[list[list[str]]]:
    """Markdown tables the notebook displayed, as rows of cells (header first, separator dropped)."""
    tables = []
    for md in _outputs(nb, "text/markdown"):
        if "|---|" not in md:
            continue
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()]
        tables.append([r for r in rows if not all(set(c) <= {"-"} for c in r)])
    return tables


def _table_with(nb, header_cell: str) -> list[list[str]]:
    matches = [t for t in _tables(nb) if header_cell in t[0]]
    assert matches, f"no table with a {header_cell!r} column"
    return matches[0]


def _percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """The kernel inherits this process's environment: a fresh work directory, one CPU device (a Colab CPU
    runtime, not the suite's 8 simulated devices)."""
    monkeypatch.setenv("TAGJAX_COLAB_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("TAGJAX_CHECKPOINT", raising=False)
    return tmp_path


def _execute(name: str, cwd: Path, timeout: int = 300):
    nb = nbformat.read(COLABS / name, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        f"{name} is stored with outputs: clear them (the test runs it)"
    )
    start = time.monotonic()
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError with the cell's traceback on any error
    return nb, time.monotonic() - start


def test_notebooks_are_plain_tagjax_clients():
    """No logic of their own: each imports tagjax, defines no functions but a table printer."""
    for name in NOTEBOOKS:
        nb = nbformat.read(COLABS / name, as_version=4)
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "from tagjax import" in source, name
        assert re.findall(r"^def (\w+)", source, re.M) == ["table"], name
        assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_notebooks_run_and_show_their_plots_and_tables(kernel_env):
    # 01: vocabulary, frequencies, resampling, samples.
    nb, seconds1 = _execute(NOTEBOOKS[0], kernel_env)
    assert (
        len(_outputs(nb, "image/png")) == 3
    )  # log-log frequencies + labels/image, resampling, samples
    labels = _table_with(nb, "WordNet synsets")
    assert len(labels) == 13 and labels[1][1].startswith("#")
    counts = [int(row[2]) for row in labels[1:]]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    canon = {row[0]: row[1:] for row in _table_with(nb, "dropped because")[1:]}
    assert canon["#Flags"][0] == canon["flag"][0] == "#flag"  # case and plural fold into one label
    assert (
        canon["#photooftheday"][0] == "-" and canon["#photooftheday"][1] != "-"
    )  # dropped, with a reason
    resampling = {row[0]: row for row in _table_with(nb, "sampling")[1:]}
    assert list(resampling) == ["natural", "sqrt", "uniform"]
    top10 = [_percent(resampling[m][2]) for m in resampling]
    assert top10[0] > top10[1] > top10[2]  # flatter sampling draws the head less ...
    tail = [_percent(resampling[m][3]) for m in resampling]
    assert tail[0] < tail[1] < tail[2]  # ... and the tail more
    assert "training images" in _text(nb)

    # 02: training and its metrics.
    nb, seconds2 = _execute(NOTEBOOKS[1], kernel_env)
    assert len(_outputs(nb, "image/png")) == 1  # loss / schedule / held-out metrics
    settings = {row[0]: row[1] for row in _table_with(nb, "setting")[1:]}
    assert settings["model"] == "tiny_resnext" and settings["sampling"] == "sqrt"
    summary = {row[0]: row[1] for row in _table_with(nb, "metric")[1:]}
    assert summary["step"] == "100" and summary["images_seen"] == "3,200"
    assert 0 <= float(summary["eval_mAP"]) <= 1 and float(summary["train_loss"]) > 0
    assert "checkpoints at steps [50, 100]" in _text(nb)

    # 03: the checkpoint of 02, hashtag predictions, the linear probe against random weights.
    nb, seconds3 = _execute(NOTEBOOKS[2], kernel_env)
    assert len(_outputs(nb, "image/png")) == 2  # predictions grid, probe bars
    predicted = _table_with(nb, "predicted")
    assert len(predicted) == 9 and all(row[2].count("#") == 3 for row in predicted[1:])
    probe = {row[0]: row for row in _table_with(nb, "test top-1")[1:]}
    assert set(probe) == {"hashtag-pretrained", "random weights"}
    for row in probe.values():
        assert 0 < _percent(row[1]) <= _percent(row[2]) <= 1  # top-1 <= top-5
    assert int(probe["hashtag-pretrained"][5]) > 50  # emoji subgroups

    print(f"notebook seconds: 01 {seconds1:.0f}, 02 {seconds2:.0f}, 03 {seconds3:.0f}")
    assert os.environ["TAGJAX_COLAB_DIR"].startswith(str(kernel_env))
