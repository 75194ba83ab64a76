"""Docs are part of the feature: generated pages are current, the site builds, the proxy hook loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_reference_pages_are_current(tmp_path: Path) -> None:
    from tidyllm._docgen import write

    for page in write(tmp_path):
        committed = ROOT / "docs" / page.name
        assert committed.read_text() == page.read_text(), (
            f"docs/{page.name} is stale: run `python -m tidyllm._docgen docs/`")


def test_mkdocs_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is a test dependency (pip install -e .[test])"
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "governance" / "index.html").exists()


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    head = text[: text.index("## In five lines")]
    assert "make demo" in head and "make test" in head


def test_litellm_proxy_hook_loads(tmp_path: Path) -> None:
    code = ("import tidyllm.proxy as p; from litellm.integrations.custom_logger import CustomLogger; "
            "print(isinstance(p.proxy_handler_instance, CustomLogger))")
    env = {**os.environ, "TIDYLLM_DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.db'}",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")
