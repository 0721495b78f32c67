"""The documents stay true: every test SECURITY.md cites as proof exists; README's two commands
are the demo and the exact test command CI runs; relative links resolve."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"`(test_[a-z0-9_]+\.py)(?:::(test_[a-z0-9_*]+))?`")


def test_every_test_cited_in_security_md_exists() -> None:
    text = (REPO / "SECURITY.md").read_text()
    citations = CITATION.findall(text)
    assert len(citations) > 20  # the page is built on them
    missing = []
    for filename, name in citations:
        path = REPO / "tests" / filename
        if not path.is_file():
            missing.append(filename)
            continue
        if name:
            defined = re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", path.read_text(),
                                 re.MULTILINE)
            if not fnmatch.filter(defined, name):
                missing.append(f"{filename}::{name}")
    assert missing == []


SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_first_command_installs_and_starts_the_demo() -> None:
    first = SH_BLOCK.findall((REPO / "README.md").read_text())[0].strip()
    assert first == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/oauth-sidecar demo"
    )


def test_readme_test_command_is_what_ci_runs() -> None:
    """.ci/run installs, then runs README's test command (its last step) exactly."""
    readme = (REPO / "README.md").read_text()
    [test_command] = [b.strip() for b in SH_BLOCK.findall(readme) if "-m pytest" in b and
                      b.strip().startswith("npm ci")]
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_command.rpartition(" && ")[2] == ".venv/bin/python -m pytest -n 2"
    for step in test_command.split(" && ")[:-1]:  # and installs what the command installs
        assert step.split()[0] in {"npm", "python3", ".venv/bin/pip"}, step


def test_relative_links_in_the_documents_resolve() -> None:
    documents = [REPO / "README.md", REPO / "SECURITY.md", *(REPO / "examples").rglob("*.md"),
                 REPO / "bench" / "README.md"]
    broken, checked = [], 0
    for document in documents:
        for target in LINK.findall(document.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            checked += 1
            if not (document.parent / target).exists():
                broken.append(f"{document.relative_to(REPO)} -> {target}")
    assert checked > 10  # README alone links SECURITY.md, bench/ and every examples/ guide
    assert broken == []


def _architecture_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Architecture")
    return readme[start:readme.index("\n## ", start + 1)]


def test_readme_architecture_names_every_module() -> None:
    """The map a newcomer reads must not fall behind the tree: each module is named in it."""
    section = _architecture_section()
    package = REPO / "oauth_sidecar"
    unnamed = [
        str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
        if path.name != "__init__.py"
        and not re.search(rf"(?<![\w/]){re.escape(path.name)}\b", section)
    ]
    assert unnamed == []


def test_readme_architecture_names_no_module_that_is_gone() -> None:
    section = _architecture_section()
    package = REPO / "oauth_sidecar"
    named = [name for name in re.findall(r"\b([a-z_]+\.py)\b", section)
             if not name.startswith("test_")]
    assert named, "the tree lists modules as name.py"
    existing = {path.name for path in package.rglob("*.py")}
    assert sorted(set(named) - existing) == []
