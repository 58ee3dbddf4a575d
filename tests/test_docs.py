"""Everything in docs/ that looks runnable runs: each page's ```python blocks in order, in a tmp
folder of its own (the pages build tiny models from configs, as the README does); every
``$ onnx-peft ...`` line parses with the real CLI parser (commands, flags and choices exist); each
docs/commands/<cmd>.md names an existing command and lists every flag of its --help."""

import re
import shlex
from pathlib import Path

import pytest

from onnx_peft.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
WITH_PYTHON = [p for p in PAGES if "```python" in p.read_text()]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("page", WITH_PYTHON, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for code in blocks(page, "python"):
        exec(compile(code, str(page), "exec"), namespace)


def test_console_lines_parse():
    parser = build_parser()
    lines = [(page, line[2:]) for page in PAGES for block in blocks(page, "console")
             for line in block.splitlines() if line.startswith("$ ")]
    assert len(lines) > 20
    for page, line in lines:
        argv = shlex.split(line)
        assert argv[0] == "onnx-peft", f"{page.name}: {line}"
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:  # argparse: unknown command, flag or choice
            pytest.fail(f"{page.name}: `{line}` does not parse (exit {exc.code})")


def test_every_command_has_a_page_listing_its_flags():
    commands = subparsers()
    pages = {p.stem: p for p in (DOCS / "commands").glob("*.md")}
    assert set(pages) == set(commands), "one page per CLI command"
    for name, page in pages.items():
        text = page.read_text()
        assert text.startswith(f"# onnx-peft {name}\n")
        flags = {s for a in commands[name]._actions for s in a.option_strings if s.startswith("--")}
        missing = sorted(f for f in flags - {"--help"} if not re.search(rf"(?<![\w-]){f}(?![\w-])", text))
        assert not missing, f"{page.name} does not document {missing}"


def test_every_command_named_exists():
    commands = set(subparsers())
    for page in PAGES:
        named = set(re.findall(r"(?:\$ |`)onnx-peft ([a-z][a-z-]*)", page.read_text()))
        assert named <= commands, f"{page.name} names unknown commands {sorted(named - commands)}"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page.name != "index.md":
            assert str(page.relative_to(DOCS)) in index, f"index.md does not link {page.relative_to(DOCS)}"
