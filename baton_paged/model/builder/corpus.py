"""Training text for the tokenizer: source files that ship with every CPython install.

Nothing is downloaded. The text is English prose (docstrings, comments) mixed with code, a fair
stand-in for what a serving engine sees. The list is fixed and read in order, so a given Python
version always yields the same corpus, and so the same tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

STDLIB_MODULES = (
    "argparse",
    "collections",
    "dataclasses",
    "difflib",
    "email.message",
    "functools",
    "inspect",
    "json",
    "logging",
    "pathlib",
    "pydoc",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "zipfile",
)


def stdlib_texts() -> list[str]:
    """The source text of each module in ``STDLIB_MODULES`` (found, not imported)."""
    texts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"this Python has no source for the stdlib module {name!r}")
        texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return texts
