"""The README and docs/ stay true to the code: the README's size, relative links, the flags of docs/cli.md against
the argparse parser, and docs/architecture.md against the package's subpackages."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from layerprune.cli import SUBCOMMANDS

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
ARCHITECTURE_DOC = DOCS / "architecture.md"
PACKAGE = REPO_ROOT / "python" / "layerprune"
README_LIMIT_BYTES = 12 * 1024

FENCE = re.compile(r"^(```|~~~).*?^\1[^\S\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks removed (their lines kept empty, so line numbers stay)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def broken_links(path: Path) -> list[str]:
    """Relative links and images of a Markdown file whose target does not exist (anchors stripped; web, mail and
    in-page links skipped), as 'file:line: target'. Code blocks and code spans are not read."""
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    text = CODE_SPAN.sub(lambda m: " " * len(m.group(0)) if "\n" not in m.group(0) else m.group(0), text)
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue
        if not (path.parent / file_part).exists():
            line = text.count("\n", 0, match.start()) + 1
            broken.append(f"{path.name}:{line}: {target}")
    return broken


def test_readme_is_at_most_12_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes, above {README_LIMIT_BYTES}: move details to docs/"


def test_relative_links_resolve():
    files = markdown_files()
    assert len(files) > 1, "docs/*.md is missing"
    broken = [line for path in files for line in broken_links(path)]
    assert broken == [], "broken relative links:\n" + "\n".join(broken)


def test_link_checker_reports_a_broken_link(tmp_path):
    (tmp_path / "present.md").write_text("# here\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# doc\n\n[fine](present.md#here) [web](https://example.org/x) [anchor](#doc)\n"
        "![missing plot](plots/missing.png)\n\n```\n[in code](not/checked.md)\n```\n"
        "See [the gone page](gone.md#section) and `[span](not/checked/either.md)`.\n",
        encoding="utf-8",
    )
    assert broken_links(doc) == ["doc.md:4: plots/missing.png", "doc.md:9: gone.md#section"]


def cli_parser() -> argparse.ArgumentParser:
    from layerprune.cli import build_parser

    return build_parser()


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1, "layerprune's parser has no subcommands"
    return dict(actions[0].choices)


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def cli_doc_sections() -> dict[str, str]:
    """docs/cli.md's text under each '## layerprune <subcommand>' heading, up to the next '## ' heading."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in CLI_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            match = re.fullmatch(r"## layerprune ([a-z-]+)\s*", line)
            current = match.group(1) if match else None
            if current is not None:
                assert current not in sections, f"docs/cli.md has two sections for {current}"
                sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def documented_flags(section: str) -> set[str]:
    """Flags written in code spans outside code blocks (`--flag`, or several in one span: `--a 1 --b 2`)."""
    spans = (m.group(2) for m in CODE_SPAN.finditer(without_code_blocks(section)))
    return {flag for span in spans for flag in FLAG.findall(span) if flag != "--help"}


def test_every_subcommand_has_a_cli_doc_section():
    commands = set(subcommand_parsers())
    assert commands == set(SUBCOMMANDS), "a subcommand failed to register"
    sections = set(cli_doc_sections())
    assert commands - sections == set(), f"docs/cli.md has no '## layerprune <command>' section for {commands - sections}"
    assert sections - commands == set(), f"docs/cli.md documents commands that do not exist: {sections - commands}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_cli_doc_lists_every_flag(command):
    parser = subcommand_parsers()[command]
    section = cli_doc_sections().get(command)
    assert section is not None, f"docs/cli.md has no '## layerprune {command}' section"
    in_parser = parser_flags(parser)
    in_doc = documented_flags(section)
    missing = sorted(in_parser - in_doc)
    extra = sorted(in_doc - in_parser)
    assert not missing and not extra, (
        f"docs/cli.md, section 'layerprune {command}', against `layerprune {command} --help`:\n"
        f"  flags of the parser the section does not list: {missing}\n"
        f"  flags the section lists that the parser does not have: {extra}"
    )


def test_every_subpackage_is_in_architecture_doc():
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert subpackages, f"no subpackages found under {PACKAGE}"
    missing = [name for name in subpackages if f"`{name}/`" not in text]
    assert missing == [], f"docs/architecture.md does not name these subpackages of layerprune (as `name/`): {missing}"
