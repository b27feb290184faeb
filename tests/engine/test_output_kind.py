"""output_kind: FINAL_ONLY requests report once, when they finish, with what CUMULATIVE ones
report last; vLLM's DELTA is refused by name."""

from __future__ import annotations

import pytest

from baton_paged import RequestOutputKind
from baton_paged.sampling_params import SamplingParams

FINAL = RequestOutputKind.FINAL_ONLY


def run(engine) -> dict[str, list]:
    """Every output each request reported, in step order."""
    reported: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            reported.setdefault(output.request_id, []).append(output)
    return reported


def test_final_only_reports_once_with_the_cumulative_final_output(make_engine):
    engine = make_engine(max_batch_size=4)
    for kind, request_id in ((FINAL, "final"), (RequestOutputKind.CUMULATIVE, "cumulative")):
        for n in (1, 2):
            params = SamplingParams(temperature=0.8, seed=7, n=n, max_tokens=9, stop=["zz"],
                                    output_kind=kind)  # fmt: skip
            engine.add_request("the same prompt", params, request_id=f"{request_id}-{n}")
    reported = run(engine)
    for n in (1, 2):
        final, cumulative = reported[f"final-{n}"], reported[f"cumulative-{n}"]
        assert len(final) == 1 and final[0].finished
        assert len(cumulative) > 1 and not cumulative[0].finished
        assert final[0].outputs == cumulative[-1].outputs


def test_the_offline_llm_builds_final_outputs_only(make_engine, monkeypatch):
    from baton_paged.entrypoints.llm import LLM

    llm = LLM.from_engine(make_engine())
    built = []
    snapshot = llm.engine.outputs.snapshot
    monkeypatch.setattr(llm.engine.outputs, "snapshot", lambda r: built.append(r) or snapshot(r))
    results = llm.generate(["a", "bb"], SamplingParams(temperature=0, max_tokens=5))
    assert [len(r.outputs[0].token_ids) for r in results] == [5, 5]
    assert len(built) == 2  # one per request, at its end; not one per request per step


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, 1, 3, "final", True])
def test_unsupported_output_kinds_are_refused_by_name(kind):
    with pytest.raises(ValueError, match="output_kind must be RequestOutputKind.CUMULATIVE"):
        SamplingParams(output_kind=kind)


def test_an_int_output_kind_is_vllms_value():
    assert SamplingParams(output_kind=2).output_kind is FINAL
