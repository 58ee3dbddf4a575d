"""Everything in the README that looks runnable runs: the Python blocks in order, then each
``$ onnx-peft ...`` line of the console blocks through the CLI's ``main``. The ``sh`` block with
``make demo`` / ``make test`` is the suite's own entry point and is exercised by CI itself."""

import re
import shlex
from pathlib import Path

from onnx_peft.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = blocks("sh")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    assert README.read_text().index("```sh") < README.read_text().index("```python")


def test_readme_python_and_cli_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks("python"):
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["with_adapter"].shape == namespace["base_only"].shape
    assert abs(namespace["with_adapter"] - namespace["base_only"]).max() > 1e-3  # the quick start shows an effect
    commands = [line[2:] for block in blocks("console") for line in block.splitlines() if line.startswith("$ ")]
    assert commands, "the README shows CLI commands"
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "onnx-peft"
        assert main(["--quiet", *argv[1:]]) == 0, command
