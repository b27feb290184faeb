"""baton-paged: BATON dynamic re-batching on a paged KV cache.

    from baton_paged import LLM, SamplingParams
    outputs = LLM().generate(["def main():"], SamplingParams(temperature=0, max_tokens=32))

Importing the package is cheap: the public names below load torch and transformers only when
first used (``module.__getattr__``), so ``baton-paged --help`` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "baton_paged.entrypoints.llm",
    "SamplingParams": "baton_paged.sampling_params",
    "BeamSearchParams": "baton_paged.sampling_params",
    "RequestOutputKind": "baton_paged.sampling_params",
    "StructuredOutputsParams": "baton_paged.structured_outputs",
    "EngineConfig": "baton_paged.config",
    "Engine": "baton_paged.engine",
    "RequestOutput": "baton_paged.outputs",
    "CompletionOutput": "baton_paged.outputs",
    "TextPrompt": "baton_paged.inputs",
    "TokensPrompt": "baton_paged.inputs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'baton_paged' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
