"""The front door: a short README whose quick start runs as written, and docs whose links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "studies").glob("*/README.md")),
         ROOT / "benchmarks" / "README.md"]


def test_the_readme_stays_a_front_door():
    assert README.stat().st_size <= 12 * 1024, "README.md is over 12 KB: move the detail to docs/, studies/ or benchmarks/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = page.read_text()
    for url in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", url) or url.startswith("#"):
            continue
        target = (page.parent / url.split("#", 1)[0]).resolve()
        assert target.exists(), f"{page.relative_to(ROOT)} links to {url}, which does not exist"


def test_the_cli_reference_is_the_parsers():
    from safesteer_lens.cli import cli_reference

    committed = (ROOT / "docs" / "cli-reference.md").read_text()
    assert committed == cli_reference(), ("docs/cli-reference.md is out of date: regenerate it with "
                                          "`python -m safesteer_lens.cli --reference > docs/cli-reference.md`")


@pytest.mark.integration
def test_the_quick_start_runs_as_written(tmp_path, monkeypatch):
    block = README.read_text().split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # it writes runs/quickstart
    namespace: dict = {}
    exec(compile(block, "README.md (quick start)", "exec"), namespace)
    assert (tmp_path / "runs" / "quickstart" / "student").is_dir()
    assert namespace["result"].metrics and len(namespace["tokens"]) > 1
