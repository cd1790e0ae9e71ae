"""Docs and man pages never drift from the code: generated files are current, links resolve,
every code and environment variable the docs cite exists, and every tool is documented."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bp_common.envvars import ENV_VARS
from bp_common.errors import CATALOG
from conftest import ROOT, declared_tools, tool_cmd
from helpers.citations import check_commands, env_names, upstream_env
from test_migrations import PENDING

# The original system's names (`backprop …`, BACKPROPAGATE_TRAINING__…) are accepted only in the
# migration guide, which maps them; everywhere else a cited variable must be one bp-* reads.
MIGRATIONS = ROOT / "docs" / "migrations.md"
UPSTREAM_REFERENCE = ROOT / "tests" / "reference" / "upstream-backpropagate.md"

DOCS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FAMILIES = ("INPUT", "DATASET", "CONFIG", "DEP", "HUB", "RUNTIME", "STATE", "GPU", "TRAIN", "EXPORT",
            "OLLAMA", "EVAL", "SLAO", "PARTIAL")
CODE_RE = re.compile(r"\b(?:%s)_[A-Z0-9_]*[A-Z0-9]\b" % "|".join(FAMILIES))


def test_generated_docs_and_man_pages_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-docs"), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_error_codes_exist(doc):
    cited = set(CODE_RE.findall(doc.read_text(encoding="utf-8")))
    env_names = {v.name for v in ENV_VARS}
    unknown = sorted(c for c in cited if c not in CATALOG and c not in env_names)
    assert not unknown, f"{doc.relative_to(ROOT)} cites codes that do not exist: {unknown}"


def unknown_variables(doc, text: str) -> list[str]:
    """BACKPROPAGATE_* names a doc cites that bp-* does not read (the guide may cite the original's)."""
    known = {v.name for v in ENV_VARS}
    if doc == MIGRATIONS:
        known |= upstream_env(UPSTREAM_REFERENCE.read_text(encoding="utf-8"))
    # A name ending in _ is a family prefix (`BACKPROPAGATE_TRAINING__…`), not a variable.
    return sorted(n for n in env_names(text) if not n.endswith("_") and n not in known)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_environment_variables_exist(doc):
    unknown = unknown_variables(doc, doc.read_text(encoding="utf-8"))
    assert not unknown, f"{doc.relative_to(ROOT)} cites variables bp-* does not read: {unknown}"


def test_original_variables_are_accepted_only_in_the_migration_guide():
    line = "Set `BACKPROPAGATE_TRAINING__LEARNING_RATE=1e-4` (see `BACKPROPAGATE_LORA__…`).\n"
    assert unknown_variables(ROOT / "docs" / "training.md", line) == ["BACKPROPAGATE_TRAINING__LEARNING_RATE"]
    assert unknown_variables(MIGRATIONS, line) == []
    assert unknown_variables(MIGRATIONS, "`BACKPROPAGATE_TRAINING__WARP`") == ["BACKPROPAGATE_TRAINING__WARP"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_bp_flags_exist(doc):
    assert check_commands(doc.read_text(encoding="utf-8"), PENDING) == []


def _env_names_in_code() -> set[str]:
    names = set()
    for base in (ROOT / "shared", ROOT / "tools"):
        for path in base.rglob("*.py"):
            names |= set(re.findall(r"\bBACKPROPAGATE_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    return names


def test_every_environment_variable_is_documented_and_read():
    documented = {v.name for v in ENV_VARS}
    in_code = _env_names_in_code()
    assert in_code - documented == set(), "read in code but not in bp_common.envvars.ENV_VARS"
    own = {n for n in documented if n.startswith("BACKPROPAGATE_")}
    # envvars.py itself names them all; a variable must be read somewhere else too.
    elsewhere = set()
    for base in (ROOT / "shared", ROOT / "tools"):
        for path in base.rglob("*.py"):
            if path.name != "envvars.py":
                elsewhere |= set(re.findall(r"\bBACKPROPAGATE_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    via_dest = {v.name for v in ENV_VARS if v.dest}
    assert own - elsewhere - via_dest == set(), "documented but never read"


def test_every_tool_has_help_man_page_cli_reference_version_and_usage_envelope():
    cli_md = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for tool in declared_tools():
        r = subprocess.run(tool_cmd(tool) + ["--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, tool
        assert (ROOT / "man" / f"{tool}.1").exists(), tool
        assert f"## {tool}\n" in cli_md, tool
        r = subprocess.run(tool_cmd(tool) + ["--version"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(f"{tool} "), tool
        r = subprocess.run(tool_cmd(tool) + ["--no-such-flag"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, tool
        assert '"INPUT_USAGE"' in r.stdout and "Traceback" not in r.stderr, tool
