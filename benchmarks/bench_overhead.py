"""Host overhead: where a decode step's time goes besides the model's forward.

    python benchmarks/bench_overhead.py [--batches 1,32,128,256] [--repeats 3] [--threads 2]
        [--device cpu|cuda] [--quick]

A near-zero model (the random-weight ``tiny`` Llama: 2 layers) decodes B requests at once (8-token
prompts, ``--output-tokens`` each, EOS ignored; greedy unless ``--temperature``, ``--top-p`` and
``--top-k`` say otherwise), so nearly everything but the forward is the
engine's own host work. Each phase of ``Engine.step`` is timed by wrapping the engine's parts
from outside (the engine is not changed for it), over decode-only steps:

- schedule: ``scheduler.schedule``; update: ``scheduler.commit`` and ``scheduler.finish``;
  swap: ``runner.swap``;
- input preparation: ``runner.execute`` less the forward (positions, metadata, copies);
- forward: the model's forward, or a CUDA graph's replay of it (on CUDA its launch: the GPU
  runs it asynchronously; the first H200 run missed replays, so its forward read 0);
- sampling: the sampler, and waiting for the device->host copy of the sampled ids;
- output processing: the rest of ``outputs.sample`` and ``outputs.accept`` (appending,
  detokenizing, stops) and
  building the step's ``RequestOutput``s: by default as the offline ``LLM`` asks for them
  (``FINAL_ONLY``: built when a request ends); ``--output-kind cumulative`` for one per request
  every step, as a stream reads them, with the step loop the server runs (``step_unbuilt``):
  the step captures each output, and building it is the reader's work on its own thread,
  timed apart (``reader_build``, not part of the step's wall time);
- other: the step's wall time less all of the above.

``--async-scheduling on`` plans each step before reading the previous one's tokens (the engine's
step-ahead scheduling; ``auto``: the engine's default for the device, on for CUDA).

Host time = step wall time - forward. On CUDA, CUDA events around each forward also give the
GPU's busy time, and its idle share of the decode wall time. Target (CPU, ``tiny``): host time per
step at B=128 <= 1.0 ms. Results: ``results/overhead-<device>.*``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import harness
import torch
from harness import Default, check

from baton_paged import LLM, RequestOutputKind, SamplingParams
from baton_paged.model.builder import cached_model
from baton_paged.model.sampled_tokens import SampledTokens
from baton_paged.processing import output_processor

PROMPT_TOKENS = 8
PHASES = ("schedule", "swap", "input_prep", "forward", "sampling", "outputs", "update", "other")


class PhaseClock:
    """Seconds per phase over the steps it keeps, from wrappers around the engine's parts."""

    def __init__(self, engine, device: torch.device):
        self.totals: dict[str, float] = defaultdict(float)
        self.step: dict[str, float] = defaultdict(float)
        self.last: dict[str, object] = {}
        """Each phase's latest return value (the schedule's: the step's plan)."""
        self.steps = 0
        self.gpu_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cuda = device.type == "cuda"
        self._wrapped: list[tuple[object, str, object]] = []
        runner, scheduler, outputs = engine.runner, engine.scheduler, engine.outputs
        self._wrap(scheduler, "schedule", "schedule")
        self._wrap(scheduler, "commit", "update")
        self._wrap(scheduler, "finish", "update")
        self._wrap(runner, "swap", "swap")
        self._wrap(runner, "execute", "execute")
        self._wrap(runner, "forward", "forward", gpu=True)
        for graph, _ in getattr(runner.graphs, "_graphs", {}).values():  # decode replays
            self._wrap(graph, "replay", "forward", gpu=True)
        self._wrap(outputs, "sample", "process")
        self._wrap(outputs, "accept", "process")
        self._wrap(outputs, "snapshot", "report")
        self._wrap(output_processor.OutputSnapshot, "build", "build")
        self._wrap(output_processor, "sample_on_device", "draw")
        self._wrap(SampledTokens, "to_host", "read")

    def _wrap(self, owner, name: str, phase: str, gpu: bool = False) -> None:
        inner: Callable = getattr(owner, name)
        self._wrapped.append((owner, name, owner.__dict__.get(name)))

        def timed(*args, **kwargs):
            if gpu and self.cuda:
                events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                events[0].record()
            start = time.perf_counter()
            try:
                self.last[phase] = inner(*args, **kwargs)
                return self.last[phase]
            finally:
                self.step[phase] += time.perf_counter() - start
                if gpu and self.cuda:
                    events[1].record()
                    self.gpu_events.append(events)

        setattr(owner, name, timed)

    def unwrap(self) -> None:
        """Put back what was wrapped (classes and modules outlive this clock's engine)."""
        for owner, name, original in reversed(self._wrapped):
            if original is None:
                delattr(owner, name)  # an instance attribute shadowing its class's method
            else:
                setattr(owner, name, original)

    def run_step(self, engine, sync: Callable[[], None], unbuilt: bool) -> None:
        """One ``engine.step`` (``step_unbuilt`` if ``unbuilt``, the outputs then built after
        the step's wall time, as readers on their own threads build them); its phases count if
        every row of it was a decode."""
        self.step.clear()
        self.gpu_events.clear()
        start = time.perf_counter()
        outputs = engine.step_unbuilt() if unbuilt else engine.step()
        sync()
        wall = time.perf_counter() - start
        reader_build = 0.0
        if unbuilt:
            in_step = self.step["build"]
            for output in outputs:
                output.build()
            reader_build = self.step["build"] - in_step
        rows = [row for forward in self.last["schedule"].forwards for row in forward.rows]
        if not rows or not all(row.decode for row in rows):
            return
        exclusive = {
            "schedule": self.step["schedule"],
            "swap": self.step["swap"],
            "input_prep": self.step["execute"] - self.step["forward"],
            "forward": self.step["forward"],
            "sampling": self.step["draw"] + self.step["read"],
            "outputs": self.step["process"]
            - self.step["draw"]
            + self.step["report"]
            + self.step["build"]
            - reader_build,
            "update": self.step["update"],
        }
        exclusive["other"] = wall - sum(exclusive.values())
        for phase, seconds in exclusive.items():
            self.totals[phase] += seconds
        self.totals["wall"] += wall
        self.totals["reader_build"] += reader_build
        self.totals["gpu"] += sum(a.elapsed_time(b) / 1e3 for a, b in self.gpu_events)
        self.steps += 1


def measure(model: str, batch: int, args, device: torch.device) -> dict:
    """Per-step milliseconds of each phase over the decode steps of one run of ``batch``."""
    ahead = {"auto": None, "on": True, "off": False}[getattr(args, "async_scheduling", "auto")]
    llm = LLM(model, max_batch_size=batch, device=str(device), enable_prefix_caching=False,
              async_scheduling=ahead)  # fmt: skip
    engine = llm.engine
    vocab = len(llm.get_tokenizer())
    kind = RequestOutputKind[args.output_kind.upper()]
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    params = SamplingParams(
        max_tokens=args.output_tokens, ignore_eos=True, output_kind=kind, **sampling
    )
    for i in range(batch):
        prompt = [(i * 7 + j) % (vocab - 1) + 1 for j in range(PROMPT_TOKENS)]
        engine.add_request({"prompt_token_ids": prompt}, params)
    sync = harness.synchronizer(device)
    while engine.snapshot.num_waiting or not engine.snapshot.num_running:
        engine.step()  # admission and prefill: not what this measures
    engine.step()  # the first decode, after the prefill step
    clock = PhaseClock(engine, device)
    while engine.has_unfinished_requests() and engine.snapshot.num_running == batch:
        clock.run_step(engine, sync, unbuilt=kind is RequestOutputKind.CUMULATIVE)
    clock.unwrap()
    engine.close()
    measured = (*PHASES, "wall", "reader_build")
    per_step = {p: 1e3 * clock.totals[p] / max(clock.steps, 1) for p in measured}
    row = {"batch": batch, "steps": clock.steps}
    row |= {f"{p}_ms": round(v, 3) for p, v in per_step.items()}
    row["host_ms"] = round(per_step["wall"] - per_step["forward"], 3)
    if device.type == "cuda":
        busy = clock.totals["gpu"] / max(clock.totals["wall"], 1e-9)
        row["gpu_idle_share"] = round(1 - busy, 3)
    return row


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows = saved["rows"]
    columns = ["batch", "wall_ms", "host_ms", *(f"{p}_ms" for p in PHASES), "reader_build_ms"]
    if any("gpu_idle_share" in row for row in rows):
        columns.append("gpu_idle_share")
    lines = [
        f"# Host overhead per decode step ({saved['environment']['device']}, {saved['model']}, "
        f"outputs {saved.get('output_kind', 'cumulative')}, sampling {saved.get('sampling')})",
        "",
        *harness.markdown(rows, columns),
    ]
    xs = [row["batch"] for row in rows]
    lines_by_phase = {p: [row[f"{p}_ms"] for row in rows] for p in PHASES}
    panels = {"ms per decode step by phase": (xs, lines_by_phase)}
    return lines, "Where a decode step's time goes", panels


def main() -> None:
    parser = harness.options(
        __doc__,
        threads=2,
        repeats=Default(3, 1),
        quick="B = 1, 32, 128 and 32 output tokens: a check that it runs",
        results="overhead-cpu",
    )
    batches = Default([1, 32, 128, 256], [1, 32, 128])
    parser.add_argument("--batches", type=harness.comma_list(int), default=batches)
    parser.add_argument("--output-tokens", type=int, default=Default(96, 32))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--output-kind",
        choices=("final_only", "cumulative"),
        default="final_only",
        help="final_only: outputs as the offline LLM asks for them (built when a request ends); "
        "cumulative: one per request every step, as a stream reads them",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto")
    args = harness.start(parser, must_include={"batches": 128})
    device = torch.device(args.device)
    model = str(cached_model("llama", "tiny"))
    runs = defaultdict(list)
    for _, batch in harness.rotations(args.batches, args.repeats):
        runs[batch].append(measure(model, batch, args, device))
        row = runs[batch][-1]
        print(f"B={batch}: {row['wall_ms']} ms per step, host {row['host_ms']} ms", flush=True)
    rows = [harness.medians(runs[batch], 3) for batch in args.batches]
    host_128 = next(row["host_ms"] for row in rows if row["batch"] == 128)
    checks = [check("host ms per decode step, B=128", host_128, 1.0, "<=")]
    payload = {
        "model": "llama-tiny",
        "output_kind": args.output_kind,
        "async_scheduling": args.async_scheduling,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
        "environment": harness.environment(args.threads, device),
        "rows": rows,
        "checks": checks,
    }
    name = args.name.replace("-cpu", f"-{device.type}")
    harness.publish(name, payload, report, [])


if __name__ == "__main__":
    main()
