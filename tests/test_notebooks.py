"""The notebooks execute on a small real run (nbclient), as a user would run them."""

from pathlib import Path

import nbclient
import nbformat
import pytest

from moecomp.search import run_search


@pytest.fixture(scope="module")
def small_search(tmp_path_factory, digits_problem, digits_target):
    out = tmp_path_factory.mktemp("nbrun") / "run"
    run_search(digits_problem, out, budget=192, progress=False)
    return out


def _execute(path: Path, repo: Path, run: Path, monkeypatch) -> str:
    monkeypatch.setenv("MOECOMP_RUN", str(run))
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(repo)}}).execute()
    return "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_pick_from_front_notebook(repo, small_search, monkeypatch):
    text = _execute(repo / "notebooks" / "pick_from_front.ipynb", repo, small_search,
                    monkeypatch)
    assert "non-dominated solutions" in text and "chosen by hand" in text
    assert text.count(".mcz") >= 2
    assert list((small_search / "exports").glob("*/*.mcz"))
