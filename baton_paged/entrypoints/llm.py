"""LLM: the offline API, shaped like vLLM's.

    llm = LLM("path/or/hub-id", max_num_seqs=16)      # or LLM() for the built-in model
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0))

Engine arguments may use vLLM's names (``vllm_args.py``); what has no meaning here is refused
by name rather than ignored.

``LLM`` holds an ``Engine`` rather than being one, so its public surface stays this small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from baton_paged.beam_search import BeamSearchOutput, beam_search
from baton_paged.engine import Engine
from baton_paged.entrypoints.model_id import served_model_id
from baton_paged.entrypoints.vllm_args import engine_options
from baton_paged.metrics import EngineMetrics
from baton_paged.metrics_reader import Metric, read
from baton_paged.outputs import RequestOutput
from baton_paged.processing.chat_prompt import Message, conversation_prompt
from baton_paged.processing.input_processor import PromptInput
from baton_paged.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class LLM:
    def __init__(
        self, model: str | None = None, *, hf_model: Any = None, tokenizer: Any = None, **options
    ):
        """``model``: a checkpoint directory, GGUF file or hub id (None: the built-in
        SmolLM2-135M-Instruct; "random": a random-weight model built locally).
        ``hf_model`` + ``tokenizer``: an already-loaded transformers model to serve instead (the
        engine follows its dtype and device). ``options``: any ``EngineConfig`` field (policy,
        max_batch_size, kv_memory, ...) or vLLM's name for one (max_num_seqs, seed, ...)."""
        if isinstance(tokenizer, str):
            raise ValueError(
                "tokenizer= takes a loaded tokenizer (with hf_model); a separate tokenizer "
                "checkpoint is not supported: keep the tokenizer files beside the model's"
            )
        options = engine_options(options)
        self._attach(Engine.build(model, hf_model=hf_model, tokenizer=tokenizer, **options))

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        """Wrap an engine that is already built (the CLI builds one from its options)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = EngineMetrics(engine, served_model_id(engine.config.model))
        """What ``get_metrics`` reads: the series a server's ``/metrics`` serves."""

    def get_metrics(self) -> list[Metric]:
        """vLLM's offline metrics: every ``vllm:`` and ``baton:`` series ``/metrics`` would
        serve for this engine (the per-request histograms over the requests ``generate`` and
        ``chat`` finished), as ``metrics_reader``'s Counter / Gauge / Histogram."""
        return read(self.metrics.registry)

    def close(self) -> None:
        """Hand the model back (see ``Engine.close``); also runs on leaving a ``with`` block."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's name): the next requests start cold."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses without ``sampling_params``: the model's generation config
        defaults (``EngineConfig.generation_config``), else ``SamplingParams()``'s."""
        return self.engine.inputs.default_params()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``.
        All requests are validated before any is queued, so a bad one queues nothing.
        ``use_tqdm``: a progress bar of finished requests on stderr, as vLLM's."""
        prompts = _as_list(prompts)
        default = self.get_default_sampling_params()
        params = _per_prompt(sampling_params, len(prompts), default)
        # only the final outputs are read here: no step builds the others (vLLM's LLM does too)
        params = [replace(param, output_kind=RequestOutputKind.FINAL_ONLY) for param in params]
        priorities = _per_prompt(priority, len(prompts), 0)
        requests = [
            self.engine.inputs.prepare(prompt, param, priority=prio)
            for prompt, param, prio in zip(prompts, params, priorities, strict=True)
        ]
        ids = [self.engine.enqueue(request) for request in requests]
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        self.metrics.observe(output)
                        bar.update(1)
        return [finished[request_id] for request_id in ids]

    def beam_search(
        self, prompts: PromptInput | Sequence[PromptInput], params: BeamSearchParams
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (``beam_search.py``): each prompt's ``params.beam_width`` best
        continuations, best first."""
        return beam_search(self, _as_list(prompts), params)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or several (a
        list of such lists) through the tokenizer's chat template; one output per conversation."""
        conversations = [messages] if _is_conversation(messages) else list(messages)
        extra = dict(chat_template_kwargs or {}) | ({"tools": tools} if tools else {})
        prompts = [
            conversation_prompt(
                self.engine.tokenizer,
                conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                **extra,
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _is_conversation(messages) -> bool:
    return not messages or isinstance(messages[0], Mapping)


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(value, count: int, default) -> list:
    if value is None:
        return [default] * count
    if isinstance(value, (SamplingParams, int)):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"got {len(value)} per-prompt values for {count} prompts")
    return value
