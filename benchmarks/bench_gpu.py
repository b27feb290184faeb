"""GPU benchmark: our paged path vs the padded vector-shaping path vs HF ``generate`` (bf16).

    python benchmarks/bench_gpu.py [--models small,smollm2] [--batch-sizes 32,128]
        [--num-requests 256] [--max-budget 256] [--repeats 1] [--systems baton,hf-generate,...]

Run by ``benchmarks/gpu_check.sh`` on a lent GPU (nothing downloaded there: the random-weight
checkpoints are built on the spot). Per model and max batch B, in bfloat16 on ``cuda``:

* ``baton``: our engine, policy baton, attention backend ``auto`` (flash-attn or xformers when
  installed, else the Triton paged kernel), K/V read from the pages in place, decode replayed
  from CUDA graphs (flash-attn and Triton);
* ``baton-triton`` / ``baton-flash`` / ``baton-xformers``: the engine on each varlen backend by
  name (flash-attn at 16-token pages is its packed form, run eagerly; xformers gathers), so the
  ``auto`` choice is read off measurements;
* ``baton-eager``: the same with ``enforce_eager``: what the graphs save;
* ``baton-padded``: the same engine on the BATON paper's padded batch + attention mask;
* ``baton-torch``: the same on per-request SDPA over gathered pages (``auto``'s CUDA order puts
  padded before it, after Triton, because this ran 2.2x slower than padded on an H200; padding's
  O(B * Qmax * Smax) cost could reverse that for one long prompt among decodes);
* ``baton-int4`` / ``baton-fp8``: ``baton`` with ``quantization=`` (``cuda_quantized.py``: int4
  groups on tinygemm, fp8 weights and per-token activations on ``_scaled_mm``);
* ``hf-generate``: static batches of B prompts, left-padded, each run to its longest budget;
* ``hf-cb``: transformers' continuous batching (``peers.run_hf_cb``, B requests per forward);
  a run that fails is recorded with its error, not as a figure.

Workload: ``bench_policies``'s seeded prompts (16-256 tokens) and lognormal budgets clipped to
``--max-budget``, every request producing exactly its budget (EOS ignored); useful output
tokens/s, systems interleaved per repeat. Beside each engine row: the bytes its decode step
reads as weights (every parameter and buffer of the model it runs, the embedding table only where
it is the LM head too) and the bound that puts on tokens/s, B rows per step at the device's
memory bandwidth (a 1 GiB device copy, timed). Results: ``results/gpu-<device name>[-tag].json``.
"""

from __future__ import annotations

import gc
import time

import harness
import torch
from harness import Default, markdown, median
from peers import run_hf_cb
from transformers import AutoModelForCausalLM, AutoTokenizer
from workload import RunResult, make_workload

from baton_paged import LLM, SamplingParams
from baton_paged.model.builder import cached_model

SYSTEMS = {
    "baton": {"attention_backend": "auto"},
    "baton-triton": {"attention_backend": "triton"},
    "baton-flash": {"attention_backend": "flash_attn"},
    "baton-xformers": {"attention_backend": "xformers"},
    "baton-eager": {"attention_backend": "auto", "enforce_eager": True},
    "baton-padded": {"attention_backend": "padded"},
    "baton-torch": {"attention_backend": "torch"},
    "baton-int4": {"attention_backend": "auto", "quantization": "int4"},
    "baton-fp8": {"attention_backend": "auto", "quantization": "fp8"},
    "hf-generate": None,
    "hf-cb": None,
}


def run_baton(model_dir, work, batch: int, options: dict) -> tuple[float, str, int]:
    llm = LLM(str(model_dir), dtype="bfloat16", device="cuda", max_batch_size=batch,
              kv_memory="0.5", **options)  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for b in work.budgets]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall, name = time.perf_counter() - start, llm.engine.snapshot.attention_backend
    weights = step_weight_bytes(llm.engine.model)
    llm.close()
    del llm  # its KV cache takes half the free memory: give it back before the next system
    gc.collect()
    torch.cuda.empty_cache()
    return wall, name, weights


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (quantized modules
    keep theirs as buffers), less the embedding table unless the LM head is that table."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not head:
        tensors.pop(id(embedding), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def memory_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read and write counted)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2**30 / seconds


def run_baton_recorded(
    model_dir, work, batch: int, options: dict
) -> tuple[float | None, str, int | None]:
    """``run_baton``, with a failure (a backend that cannot build or run here) recorded as the
    row's attention name instead of ending the benchmark."""
    try:
        return run_baton(model_dir, work, batch, options)
    except Exception as error:  # noqa: BLE001 - reported in the row, the next system runs
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{options} failed: {type(error).__name__}: {error}", flush=True)
        return None, f"failed: {type(error).__name__}: {str(error)[:200]}", None


def run_hf_generate(model, work, batch: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, len(work.prompts), batch):
        prompts, budgets = work.prompts[lo : lo + batch], work.budgets[lo : lo + batch]
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding, as generate wants it
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max(budgets),
                       min_new_tokens=max(budgets), do_sample=False, pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_cb(model, work, batch: int) -> float | None:
    result = RunResult(system="hf-cb", batch_size=batch, repeat=0)
    harness.recorded(result, lambda: run_hf_cb(model, work, batch, result))
    if result.error:
        print(f"hf-cb failed: {result.error}", flush=True)
        return None
    return result.wall_s


def main() -> None:
    parser = harness.options(__doc__, threads=4, repeats=Default(1, 1))
    parser.add_argument("--models", type=harness.comma_list(str), default=["small", "smollm2"])
    parser.add_argument("--batch-sizes", type=harness.comma_list(int), default=[32, 128])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-budget", type=int, default=256)
    parser.add_argument("--systems", type=harness.comma_list(str), default=list(SYSTEMS))
    parser.add_argument("--tag", default="", help="suffix of the results file's name")
    args = harness.start(parser)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    rows, bandwidth = [], memory_bandwidth()
    print(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for size in args.models:
        model_dir = cached_model("llama", size)
        vocab = len(AutoTokenizer.from_pretrained(model_dir))
        work = make_workload(args.num_requests, vocab, args.max_budget, args.seed)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        for batch in args.batch_sizes:
            for repeat, system in harness.rotations(args.systems, args.repeats):
                options, weights = SYSTEMS[system], None
                if system == "hf-cb":
                    wall, name = run_cb(hf, work, batch), "sdpa (continuous batching)"
                elif options is None:
                    wall, name = run_hf_generate(hf, work, batch), "sdpa"
                else:
                    wall, name, weights = run_baton_recorded(model_dir, work, batch, options)
                rows.append(
                    {
                        "model": size,
                        "B": batch,
                        "system": system,
                        "attention": name,
                        "repeat": repeat,
                        "tok/s": None if wall is None else round(work.total_budget / wall, 1),
                        "weights GB": weights and round(weights / 1e9, 3),
                        "bound tok/s": weights and round(batch * bandwidth / weights, 1),
                    }
                )
                print(rows[-1], flush=True)
    summary = []
    for size in args.models:
        for batch in args.batch_sizes:
            mine = [r for r in rows if r["model"] == size and r["B"] == batch]
            speed = {s: median(r["tok/s"] for r in mine if r["system"] == s) for s in args.systems}
            for system in args.systems:
                bound = next((r["bound tok/s"] for r in mine if r["system"] == system), None)
                summary.append(
                    {
                        "model": size,
                        "B": batch,
                        "system": system,
                        "tok/s": speed[system],
                        "x hf-generate": harness.ratio(speed[system], speed.get("hf-generate"), 2),
                        "x baton": harness.ratio(speed[system], speed.get("baton"), 2),
                        "bound tok/s (weights read once a step)": bound,
                        "share of bound": harness.ratio(speed[system], bound, 2),
                    }
                )
    print("\n".join(markdown(summary)))
    device = torch.cuda.get_device_name().replace(" ", "-")
    env = harness.environment(args.threads, torch.device("cuda"))
    name = f"gpu-{device}" + (f"-{args.tag}" if args.tag else "")
    payload = {"environment": env, "args": vars(args), "bandwidth_GBps": bandwidth / 1e9,
               "runs": rows, "summary": summary}  # fmt: skip
    harness.write_json(name, payload)


if __name__ == "__main__":
    main()
