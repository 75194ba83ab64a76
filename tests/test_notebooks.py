"""Every notebook in ``notebooks/`` runs top to bottom in a real Jupyter kernel (nbclient) against the local
stack it starts itself; any cell error fails the test."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "tidyllm-test-python"


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A kernelspec that runs *this* interpreter (the venv's ipykernel), and a hermetic kernel environment."""
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    install(kernel_name=KERNEL, display_name="tidyllm tests", prefix=str(prefix))
    env = dict(os.environ)  # conftest already dropped TIDYLLM_* and pointed TIDYLLM_HOME at a temp dir
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", IPYTHONDIR=str(tmp_path / "ipython"),
               MPLCONFIGDIR=str(tmp_path / "matplotlib"))
    return env


def test_every_notebook_is_found() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "analysis.ipynb", "applications.ipynb"}


def _outputs(nb: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _text(out: dict[str, Any]) -> str:
    if out.get("output_type") == "stream":
        return str(out.get("text", ""))
    data = out.get("data", {})
    return str(data.get("text/plain", ""))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path: Path, tmp_path: Path, kernel_env: dict[str, str]) -> None:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert spec.argv[0] == sys.executable  # the kernel runs the venv this test runs in
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=180, resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=kernel_env)  # raises CellExecutionError on the first failing cell
    outputs = _outputs(nb)
    assert not [out for _, out in outputs if out.get("output_type") == "error"]
    text = "\n".join(_text(out) for _, out in outputs)
    pngs = [out for _, out in outputs if "image/png" in out.get("data", {})]
    assert pngs, "no chart was drawn"
    if path.stem == "quickstart":
        assert text.count(" out tokens · $") == 4  # a receipt under each of the four governed answers
        assert "department finance: " in text and "department risk: " in text
        assert "UsageError: over budget: department 'marketing' has $0.00 left of $0.00 this month" in text
        assert "UsageError: not authorised: rule '" in text
        assert "audit chain verified" in text
    if path.stem == "applications":
        assert "mvr_review: 12 call(s)" in text and "flagged findings: 0" in text
        assert "more than --max-cost $0.010000 allows" in text  # refused up front
        assert "stopped after " in text and "department 'interns' (month) budget" in text
        assert "The single-obligor exposure limit is 7.5 percent of Tier 1 capital [1]." in text
        assert "'route': 'chat-small'" in text and "'chunk_tokens': 800" in text  # the optimal config
        assert "audit chain verified" in text
    if path.stem == "analysis":
        assert "audit chain verified" in text and "audit chain BROKEN at row seq=10" in text
        assert len(pngs) >= 4
