"""StructuredOutputsParams: the grammar a request's output must follow (vLLM's API).

``SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`` makes every token the
request samples one its grammar allows, so the text parses as the schema (or matches the regex,
is one of the choices, follows the grammar). Exactly one constraint is set. Here only the shape
of the spec is checked; whether it compiles (a valid schema, a regex that parses) is checked when
the request is prepared, against the engine's tokenizer (``processing/grammars.py``), still before
anything is queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: Any = None
    """A JSON schema (a dict or its JSON text): the output is a JSON value valid against it.
    Kept as JSON text (keys in the order given: properties come out in it), so the params stay
    hashable."""
    regex: str | None = None
    """A regular expression (Rust ``regex`` syntax) the whole output matches."""
    choice: Any = None
    """A non-empty list of strings: the output is exactly one of them."""
    grammar: str | None = None
    """A context-free grammar, in Lark syntax (llguidance's) or llama.cpp's GBNF."""
    json_object: bool | None = None
    """True: the output is some JSON object (OpenAI's ``{"type": "json_object"}``)."""
    disable_any_whitespace: bool = False
    """JSON without whitespace between tokens (vLLM's name)."""
    whitespace_pattern: str | None = None
    """A regex for the whitespace allowed between JSON tokens (default: up to 32 whitespace
    characters, ``processing/grammars.py``)."""

    def __post_init__(self) -> None:
        set_ = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(set_) != 1:
            found = ", ".join(set_) or "none"
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {found}"
            )
        if self.json is not None:
            object.__setattr__(self, "json", _canonical_schema(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", _choices(self.choice))
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.json_object not in (None, True, False):
            raise ValueError(
                f"structured_outputs.json_object must be a bool, got {self.json_object!r}"
            )

    @property
    def kind(self) -> str:
        """The one constraint set: json, regex, choice, grammar or json_object."""
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    def cache_key(self) -> str:
        """Equal for specs that compile to the same grammar."""
        value = getattr(self, self.kind)
        return json.dumps([self.kind, value, self.disable_any_whitespace, self.whitespace_pattern])


def _canonical_schema(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        kind = type(schema).__name__
        raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {kind}")
    return json.dumps(schema)  # key order kept: a schema's property order is its output's


def _choices(choice: Any) -> tuple[str, ...]:
    if isinstance(choice, str) or not isinstance(choice, (list, tuple)):
        raise ValueError("structured_outputs.choice must be a list of strings")
    if not choice:
        raise ValueError("structured_outputs.choice must not be empty")
    if not all(isinstance(item, str) for item in choice):
        raise ValueError("structured_outputs.choice must hold only strings")
    return tuple(choice)
