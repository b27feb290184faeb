"""The OpenAPI document the app serves, made to say what the server enforces.

FastAPI derives it from the request models, which carry the fixed ranges (``n >= 1``, ``top_p``
in (0, 1], ...). What it cannot know is written in here: the limits this server was started with
(``ServerLimits``, the engine's ``max_logprobs``) as maxima on the fields they bound, the refusals
below the routes (408, 413, 431) on every operation, the bearer-token scheme when an API key is
set, and that a bad body is OpenAI's 400, not FastAPI's 422. Limits no schema can say (the total
length of the stop strings, token ids within the vocabulary, prompt + max_tokens within the
context) are in the field descriptions and refused with a 400. Schemathesis checks every answer
the server gives against it (status, content type, body) in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

from baton_paged.entrypoints.server.limits import ServerLimits

REQUEST_SCHEMAS = ("CompletionRequest", "ChatCompletionRequest")


def published_schema(
    openapi: Callable[[], dict], limits: ServerLimits, max_logprobs: int, bearer: bool
) -> Callable[[], dict]:
    """``app.openapi`` with the limits, the security scheme and no 422s."""

    def schema() -> dict:
        spec = openapi()  # FastAPI builds it once and caches it; this edits the cached one
        components = spec.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        for name in REQUEST_SCHEMAS:
            declare_limits(components["schemas"][name]["properties"], limits, max_logprobs)
        if bearer:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in spec["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                operation["responses"].update(below_the_routes())
                if bearer and path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
        return spec

    return schema


BELOW_THE_ROUTES = {
    "408": "The client did not send its request within --read-timeout.",
    "413": "The body is larger than --max-body-bytes.",
    "431": "The request line and headers exceed --max-header-bytes or --max-headers.",
}


def below_the_routes() -> dict:
    """The refusals any operation may get before its route runs."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {
        status: {"description": description, "content": error}
        for status, description in BELOW_THE_ROUTES.items()
    }


def declare_limits(properties: dict, limits: ServerLimits, max_logprobs: int) -> None:
    """Write each limit into the non-null forms of the fields it bounds."""
    bounds = {
        "n": {"maximum": limits.max_best_of},
        "best_of": {"maximum": limits.max_best_of},
        "logprobs": {"maximum": max_logprobs},
        "top_logprobs": {"maximum": max_logprobs},
        "prompt_logprobs": {"maximum": max_logprobs},
        "logit_bias": {"maxProperties": limits.max_logit_bias},
        "stop_token_ids": {"maxItems": limits.max_stop_token_ids},
        "stop": {"maxItems": limits.max_stop_sequences, "maxLength": limits.max_stop_chars},
    }
    stop = properties["stop"]
    stop["description"] = (
        f"Strings that end a choice: at most {limits.max_stop_sequences}, non-empty, "
        f"{limits.max_stop_chars} characters in all."
    )
    for form in properties["logit_bias"]["anyOf"]:
        if form.get("type") == "object":
            form["propertyNames"] = {"pattern": "^[0-9]+$"}  # token ids, as JSON object keys
    for name, bound in bounds.items():
        for form in properties.get(name, {}).get("anyOf", ()):
            kind = form.get("type")
            if kind == "integer" and "maximum" in bound:
                form["maximum"] = bound["maximum"]
            elif kind == "object" and "maxProperties" in bound:
                form["maxProperties"] = bound["maxProperties"]
            elif kind == "array" and "maxItems" in bound:
                form["maxItems"] = bound["maxItems"]
                if "maxLength" in bound:
                    form["items"]["maxLength"] = bound["maxLength"]
            elif kind == "string" and "maxLength" in bound:
                form["maxLength"] = bound["maxLength"]
