"""What the docs cite, checked against the code: `bp-tool [sub] --flag` commands and BACKPROPAGATE_* names.

Also reads the original system's reference (tests/reference/upstream-backpropagate.md) into its
verbs, flags and environment variables, so docs/migrations.md can be held to cover all of them.
Pure text functions; the tests call them on the real files and on deliberately wrong lines.
"""
from __future__ import annotations

import argparse
import importlib
import re

LONG_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
BP_ENV = re.compile(r"\bBACKPROPAGATE_[A-Z0-9_]*[A-Z0-9_](?![A-Z0-9_*])")


# -- bp-* commands ---------------------------------------------------------------------------------

def tool_parser(tool: str) -> argparse.ArgumentParser | None:
    """get_parser() of bp-<name> (tools/bp_<name>/cli.py), or None when no such tool exists."""
    name = tool.removeprefix("bp-")
    if not re.fullmatch(r"[a-z]+", name):
        return None
    try:
        module = importlib.import_module(f"bp_{name}.cli")
    except ModuleNotFoundError:
        return None
    return module.get_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_segments(text: str) -> list[str]:
    """Every piece of a code span or fenced block that starts with a bp-* tool name."""
    pieces = [m.group(1) for m in FENCE.finditer(text)]
    pieces += CODE_SPAN.findall(FENCE.sub("", text))
    segments = []
    for piece in pieces:
        piece = piece.replace("\\\n", " ")
        for seg in re.split(r"\n|\||;|&&|\$\(|\)", piece):
            seg = seg.strip()
            if re.match(r"bp-[a-z*]+(\s|$)", seg):
                segments.append(seg)
    return segments


def check_command(segment: str, pending: dict[str, set[str]] | None = None) -> list[str]:
    """Problems with one `bp-tool [sub] --flag ...` citation: unknown tool, subcommand or flag.

    pending: {tool: flags} allowed to be missing from that tool's parser (work landing elsewhere);
    a pending flag the parser does have is simply fine.
    """
    words = segment.split()
    tool = words[0]
    if tool == "bp-*":
        return []
    parser = tool_parser(tool)
    if parser is None:
        return [f"{segment!r}: no tool {tool}"]
    subs = _subparsers(parser)
    where = parser
    if len(words) > 1 and words[1] in subs:
        where = subs[words[1]]
    elif subs and getattr(parser, "default_command", None):
        where = subs[parser.default_command]
    problems = []
    allowed = (pending or {}).get(tool, set())
    for word in words[1:]:
        if not re.match(r"--?[A-Za-z]", word):
            continue
        flag = word.split("=", 1)[0]
        if flag not in where._option_string_actions and flag not in allowed:
            problems.append(f"{segment!r}: {where.prog} has no {flag}")
    return problems


def check_commands(text: str, pending: dict[str, set[str]] | None = None) -> list[str]:
    """Problems with every bp-* command a Markdown text cites."""
    problems = []
    for seg in command_segments(text):
        problems += check_command(seg, pending)
    return problems


# -- tables of a Markdown document ------------------------------------------------------------------

def table_rows(text: str) -> list[tuple[str, list[str]]]:
    """(the nearest heading above, cells) for every body row of every table (header rows skipped)."""
    rows, heading, in_table = [], "", False
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            in_table = False
            continue
        if not in_table:  # the header row
            in_table = True
            continue
        if re.fullmatch(r"\|[\s:|-]+\|?", line):
            continue
        rows.append((heading, [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]))
    return rows


def env_names(text: str) -> set[str]:
    return set(BP_ENV.findall(text))


# -- the original system's reference ----------------------------------------------------------------

def _section(text: str, number: int) -> str:
    m = re.search(rf"^## {number}\. .*?(?=^## {number + 1}\. |\Z)", text, re.S | re.M)
    if not m:
        raise ValueError(f"reference has no section {number}")
    return m.group(0)


def upstream_cli(text: str) -> dict[str, set[str]]:
    """{verb: long flags} of the original `backprop` CLI; '' holds the flags every verb takes.

    Nested verbs are named in full ("data report", "ollama register").
    """
    cli = _section(text, 1)
    verbs: dict[str, set[str]] = {}
    every = re.search(r"^\*\*Flags on every verb\*\*.*$", cli, re.M)
    tiers = re.search(r"^\*\*Tiers\*\*[^:]*:(.*)$", cli, re.M)
    if not every or not tiers:
        raise ValueError("reference §1 lost its 'Flags on every verb' or 'Tiers' line")
    verbs[""] = set(LONG_FLAG.findall(every.group(0)))
    tier_verbs = set()
    for group in tiers.group(1).split(".")[0].split(";"):
        tier_verbs |= {v.strip() for v in group.split("=", 1)[1].split(",")}
    for m in re.finditer(r"^### (.*?)\n(.*?)(?=^### |\Z)", cli, re.S | re.M):
        title, body = m.group(1), m.group(2)
        if title.startswith("Other verbs"):
            for bullet in re.findall(r"^- `([^`]+)`(.*)$", body, re.M):
                words = []
                for w in bullet[0].split():
                    if not re.fullmatch(r"[a-z][a-z-]*", w):
                        break
                    words.append(w)
                verbs.setdefault(" ".join(words), set()).update(LONG_FLAG.findall(bullet[0] + bullet[1]))
        else:
            verbs.setdefault(title.split()[0], set()).update(LONG_FLAG.findall(body))
    shares = re.search(r"Shares with train: (.*?) and all the β/γ/KTO knobs", cli)
    if not shares or "multi-run" not in verbs:
        raise ValueError("reference lost multi-run's 'Shares with train' line")
    verbs["multi-run"] |= {"--" + s.strip() for s in shares.group(1).split(",")}
    verbs["multi-run"] |= {f for f in verbs["train"] if re.search(r"beta|gamma|kto", f)}
    nested_parents = {v.split()[0] for v in verbs if " " in v}
    for v in tier_verbs - nested_parents:
        verbs.setdefault(v, set())
    return verbs


def upstream_env(text: str) -> set[str]:
    """Every environment variable the original system read, by full name."""
    env = _section(text, 3)
    names = {n for n in env_names(text) if not n.endswith("_")}
    names |= {"BACKPROPAGATE_" + n for n in re.findall(r"`([A-Z][A-Z0-9]*__[A-Z0-9_]+)`", env)}
    for group, fields in re.findall(r"`([A-Z_]+__)\{([A-Z0-9_,]+)\}`", env):
        names |= {f"BACKPROPAGATE_{group}{f}" for f in fields.split(",")}
    blocks = re.findall(r"^- \*\*(.+?)\*\*(.*?)(?=^- |\Z)", env, re.S | re.M)
    if len(blocks) < 8:
        raise ValueError("reference §3 lost its '- **GROUP__**' blocks")
    for label, body in blocks:
        chunks = [c.strip() for c in re.split(r"\n\s*- ", body)]
        if label == "Also read":
            names |= set(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", re.sub(r"\([^()]*\)", "", body)))
            continue
        if label.endswith("__"):
            prefix = "BACKPROPAGATE_" + label
        elif label == "Raw variables":
            prefix = "BACKPROPAGATE_"
        else:
            continue
        for chunk in chunks:
            if "DRIFT" in chunk:
                continue
            chunk = re.sub(r"\([^()]*\)", "", chunk.replace("**", "")).lstrip(": ")
            sub = prefix
            label_m = re.match(r"([A-Z]+_) variables:|[A-Z][a-z]+:", chunk)
            if label_m:
                sub += label_m.group(1) or ""
                chunk = chunk[label_m.end():]
            for item in chunk.split(","):
                m = re.match(r"\s*([A-Z](?:[A-Z0-9_]*[A-Z0-9])?)\b", item)
                if m:
                    names.add(sub + m.group(1))
    return names
