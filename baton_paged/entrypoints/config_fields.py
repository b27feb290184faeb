"""EngineConfig's (and ServerLimits') fields, defaults and docstrings, read from their source
without importing it: the CLI builds its options from them, and ``baton-paged --help`` must not
load torch."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

CONFIG_SOURCE = Path(__file__).parents[1] / "config.py"
LIMITS_SOURCE = Path(__file__).with_name("server") / "limits.py"


@dataclass(frozen=True)
class ConfigField:
    name: str
    type: type
    """int, float, bool or str (the annotation without ``| None``)."""
    default: object
    doc: str


def config_fields(
    class_name: str = "EngineConfig", source: Path = CONFIG_SOURCE
) -> dict[str, ConfigField]:
    """The fields of the dataclass ``class_name`` defined in the file ``source``."""
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields = {}
    for node, after in zip(cls.body, [*cls.body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        doc = ast.literal_eval(after.value) if _is_docstring(after) else ""
        kind = {"int": int, "float": float, "bool": bool}.get(_base_type(node.annotation), str)
        name = node.target.id
        fields[name] = ConfigField(name, kind, ast.literal_eval(node.value), " ".join(doc.split()))
    return fields


def _is_docstring(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def _base_type(annotation: ast.expr) -> str:
    """``int | None`` -> ``int``."""
    if isinstance(annotation, ast.BinOp):
        return _base_type(annotation.left)
    return annotation.id if isinstance(annotation, ast.Name) else "str"
