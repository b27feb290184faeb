"""The base of every request model and its text type: what a body's JSON must be, exactly.

Request bodies are read strictly: a JSON value of the wrong type is a 400 naming the field,
never coerced (``prompt: [false]`` is not the token id 0, ``"n": "2"`` is not 2), and a number
must be finite (Python's JSON reader takes ``Infinity``, ``NaN`` and ``1e999``), so that the
server accepts what its published schema declares and no more: a client that passes the schema
is not surprised, one that does not gets the field's name. Text must be valid Unicode: JSON can
carry a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can encode.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"not valid Unicode text (a lone surrogate {text[error.start]!r} at index "
            f"{error.start}); send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
"""A string the tokenizer can encode."""
