"""docs/migrations.md covers the whole original CLI and cites only what bp-* really has.

The original's verbs, flags and environment variables are read from its reference
(tests/reference/upstream-backpropagate.md), so updating the reference without the guide fails;
every `bp-tool [sub] --flag` and BACKPROPAGATE_* name the guide cites is checked against the
tools' get_parser() and bp_common.envvars.
"""
from __future__ import annotations

import re

import pytest

from bp_common.envvars import ENV_VARS
from conftest import ROOT
from helpers.citations import (CODE_SPAN, LONG_FLAG, check_command, check_commands, command_segments, env_names,
                               table_rows, upstream_cli, upstream_env)

REFERENCE = ROOT / "tests" / "reference" / "upstream-backpropagate.md"
GUIDE = ROOT / "docs" / "migrations.md"

# bp-train flags a branch in flight adds, allowed to be missing from the parser until it merges (a
# pending flag the parser already has is fine). Empty now: every flag the guide cites exists.
PENDING_FLAGS: set[str] = set()
PENDING = {"bp-train": PENDING_FLAGS}


def guide_flags(text: str) -> dict[str, set[str]]:
    """{verb: original flags in the first column} from the '### `backprop VERB`' tables ('' = every verb)."""
    out: dict[str, set[str]] = {}
    for heading, cells in table_rows(text):
        m = re.fullmatch(r"`backprop ([a-z -]+)`", heading)
        if m:
            verb = m.group(1)
        elif heading == "Flags on every verb":
            verb = ""
        else:
            continue
        out.setdefault(verb, set()).update(LONG_FLAG.findall(cells[0]))
    return out


def guide_verbs(text: str) -> set[str]:
    """Verbs named in the first column of the Subcommands table."""
    verbs = set()
    for heading, cells in table_rows(text):
        if heading == "Subcommands":
            verbs |= {m.group(1) for m in re.finditer(r"`backprop ([a-z -]+)`", cells[0])}
    return verbs


def guide_env(text: str) -> set[str]:
    """Names in the first column of the tables under '## Environment variables'."""
    section = text.split("## Environment variables", 1)[1]
    names = set()
    for _, cells in table_rows(section):
        names |= {s for s in CODE_SPAN.findall(cells[0]) if re.fullmatch(r"[A-Z][A-Z0-9_]+", s)}
    return names


def missing_from_guide(reference: str, guide: str) -> list[str]:
    """Original verbs, flags and variables that the guide's tables do not name."""
    problems = []
    flags, verbs = guide_flags(guide), guide_verbs(guide)
    for verb, wanted in upstream_cli(reference).items():
        if verb and verb not in verbs:
            problems.append(f"verb `backprop {verb}` not in the Subcommands table")
        where = f"`backprop {verb}`" if verb else "every verb"
        for flag in sorted(wanted - flags.get(verb, set())):
            problems.append(f"{where} {flag} not in its table")
    for name in sorted(upstream_env(reference) - guide_env(guide)):
        problems.append(f"environment variable {name} not in a table")
    return problems


def bad_env_citations(guide: str) -> list[str]:
    """BACKPROPAGATE_* names in the bp-* column (the second) that no bp-* code reads."""
    known = {v.name for v in ENV_VARS}
    problems = []
    for heading, cells in table_rows(guide):
        if len(cells) > 1:
            problems += [f"{heading}: {n} is not read by bp-*" for n in env_names(cells[1]) - known]
    return problems


@pytest.fixture(scope="module")
def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_reference_parses_into_the_known_shape(reference):
    verbs = upstream_cli(reference)
    assert {"train", "multi-run", "export", "data report", "ollama register", "list-runs", "ui"} <= set(verbs)
    assert {"--lora-r", "--lora-preset", "--samples", "--fp8"} <= verbs["train"]
    assert {"--merge-strategy", "--orpo-beta", "--use-dora"} <= verbs["multi-run"]  # incl. shared with train
    assert {"--verbose", "--log-file"} <= verbs[""]
    env = upstream_env(reference)
    assert {"BACKPROPAGATE_TRAINING__LEARNING_RATE", "BACKPROPAGATE_LORA__R", "BACKPROPAGATE_DATA__MAX_SAMPLES",
            "BACKPROPAGATE_TRAINING__OOM_RECOVERY", "BACKPROPAGATE_MULTI_RUN__NUM_RUNS", "BACKPROPAGATE_UI_PORT",
            "BACKPROPAGATE_LLAMA_CPP_PATH", "BACKPROPAGATE_DEBUG", "HUGGING_FACE_HUB_TOKEN"} <= env
    assert not any(n.startswith("BACKPROPAGATE_") and n.endswith("_") for n in env)


def test_guide_names_every_original_verb_flag_and_variable(reference, guide):
    assert missing_from_guide(reference, guide) == []


def test_a_reference_update_without_a_guide_update_fails(reference, guide):
    newer = reference.replace("- `--steps` = 100.", "- `--steps` = 100.\n- `--warp-speed` = off.", 1)
    newer = newer.replace("- **DATA__**: DATASET_NAME", "- **DATA__**: CACHE_DIR none, DATASET_NAME", 1)
    assert newer != reference
    problems = missing_from_guide(newer, guide)
    assert "`backprop train` --warp-speed not in its table" in problems
    assert "environment variable BACKPROPAGATE_DATA__CACHE_DIR not in a table" in problems
    dropped = guide.replace("| `backprop ui` |", "| `backprop webui` |")
    assert "verb `backprop ui` not in the Subcommands table" in missing_from_guide(reference, dropped)


def test_every_bp_command_the_guide_cites_exists(guide):
    assert check_commands(guide, PENDING) == []


def test_command_checker_catches_wrong_flags_tools_and_subcommands():
    assert check_command("bp-train --lora-r 8") == []
    assert check_command("bp-train --no-such-flag") == [
        "'bp-train --no-such-flag': bp-train train has no --no-such-flag"]
    assert check_command("bp-train runs --limit 3") == []
    assert check_command("bp-train runs --lora-r 8") != []  # a train flag on another subcommand
    assert check_command("bp-prep report --strict") == []
    assert check_command("bp-eval compare --gate --gate-metric loss") == []
    assert check_command("bp-eval compare --metric token_f1") != []  # --metric belongs to bp-eval run
    assert check_command("bp-ollama create --base llama3.2") == []
    assert check_command("bp-vram --vram-gb 24") == []
    assert check_command("bp-nope --x") == ["'bp-nope --x': no tool bp-nope"]
    # A pending flag passes only while pending, and a pending flag that exists is fine.
    assert check_command("bp-train --warp-speed", {"bp-train": {"--warp-speed"}}) == []
    assert check_command("bp-train --warp-speed") != []
    assert check_command("bp-train --lora-r 8", {"bp-train": {"--lora-r"}}) == []
    # Pipelines and code blocks are split into their commands.
    text = "`bp-prep d.jsonl -o x | bp-train --bogus`\n```sh\nbp-merge -o m \\\n | bp-gguf -q f16 --nah\n```\n"
    assert [p.split(":")[-1].strip() for p in check_commands(text)] == ["bp-gguf convert has no --nah",
                                                                       "bp-train train has no --bogus"]


def test_pending_flags_are_the_guides_bp_train_flags(guide):
    # A pending name the guide does not cite would be a typo that silently allows a wrong flag.
    cited = {w for seg in command_segments(guide) if seg.startswith("bp-train") for w in seg.split()}
    assert PENDING_FLAGS <= cited
    assert set(PENDING) == {"bp-train"}


def test_bp_variables_in_the_guide_are_read_by_the_code(guide):
    assert bad_env_citations(guide) == []
    wrong = guide + "\n| original | bp-* | notes |\n|---|---|---|\n| `X` | `BACKPROPAGATE_TRAIN_LR` | |\n"
    assert bad_env_citations(wrong) == ["Other variables: BACKPROPAGATE_TRAIN_LR is not read by bp-*"]
    assert bad_env_citations(guide.replace("| `BACKPROPAGATE_LOG_FORMAT` |", "| `BACKPROPAGATE_LOG_STYLE` |")) \
        == ["Other variables: BACKPROPAGATE_LOG_STYLE is not read by bp-*"]


def test_guide_is_linked_from_the_readme_and_the_handbook():
    assert "(docs/migrations.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(migrations.md)" in (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
