"""Fixtures of the fuzz suite: the seed corpus, built once per session and shared by xdist workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for folder in (str(HERE), str(HERE.parent)):  # fuzz_* helpers and tiny_models, however pytest was started
    if folder not in sys.path:
        sys.path.insert(0, folder)


@pytest.fixture(scope="session")
def fuzz_corpus(tmp_path_factory) -> dict[str, str]:
    """{item: path} of tests/fuzz/fuzz_corpus.py; under xdist the workers' basetemps share a parent."""
    from fuzz_corpus import shared

    base = tmp_path_factory.getbasetemp()
    return shared((base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "fuzz_corpus")
