"""The documentation stays true to the code: the configuration reference is generated from
translate/config.py, the README stays a short first page that links every docs page, its test
command is the one CI runs, and no relative link points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

from translate.config import SECTIONS, reference_markdown, valid_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target), text across lines too
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def test_configuration_page_is_generated_from_config():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == reference_markdown(), "docs/configuration.md is out of date: run `python docs/configuration.py`"


def test_every_config_key_has_a_meaning():
    page = reference_markdown()
    for key in valid_keys():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert row.rstrip(" |").split(" | ")[-1].strip(), f"{key} has no comment in translate/config.py"
    assert all(f"## `{section}`" in page for section in SECTIONS)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move details to docs/"


def test_readme_links_every_docs_page():
    readme = README.read_text(encoding="utf-8")
    targets = {target.split("#")[0] for target in LINK.findall(readme)}
    missing = [f"docs/{page.name}" for page in DOCS if f"docs/{page.name}" not in targets]
    assert not missing, f"README.md links none of {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip("`\n") for block in FENCE.findall(setup)]
    command = next(block for block in blocks if "pytest" in block)
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci == [command]


def _anchors(page: Path) -> set[str]:
    """The fragment GitHub gives each heading of a page."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for page in [README, *DOCS]:
        for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, f"links to nothing: {broken}"
