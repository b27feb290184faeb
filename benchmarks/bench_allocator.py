"""Allocator benchmark: bookkeeping cost per page and per decode step, and swap bandwidth.

    python benchmarks/bench_allocator.py [--threads 1] [--repeats 9] [--device cpu|cuda]

Targets, on the small model (8 layers, 4 KV heads, head dim 64, float32, page 16):
- swap-out and swap-in of 64 pages reach >= 0.8x the bandwidth of one plain contiguous
  ``copy_`` of the same bytes;
- the allocator's work in one decode step at batch 32 costs < 1% of that step's forward.
The allocator's work per decode step is what the engine does around a decode forward: grow a
page for each request whose next token starts one, gather the batch's block-table rows and build
the step's ``AttentionMetadata`` (slot mapping, sequence offsets, block table tensor), then
retire finished requests and insert new ones. The decode step is measured as plain HF's forward
of one token per sequence over a dense cache of 200 tokens: the model-side work our bookkeeping
sits beside.
"""

from __future__ import annotations

import harness
import numpy as np
import torch
from harness import environment, interleaved, synchronizer, time_once
from transformers import AutoModelForCausalLM, DynamicCache

from baton_paged.allocator import (
    BlockTable,
    HostSwapPool,
    KVCache,
    KVCacheSpec,
    PagePool,
    execute_swap,
    pages_needed,
    plan_swap_in,
    plan_swap_out,
    release_source,
)
from baton_paged.attention import AttentionMetadata
from baton_paged.attention.cpu_extension import cpu_kernels
from baton_paged.model.builder import cached_model

BATCH = 32
PAGE_SIZE = 16
SWAP_PAGES = 64
CONTEXT = 200


def alloc_free_ns_per_page(pages_per_call: int, calls: int = 20000) -> float:
    pool = PagePool(4096)
    seconds = time_once(
        lambda: [pool.free(pool.allocate(pages_per_call)) for _ in range(calls)], lambda: None
    )
    return seconds / (calls * pages_per_call) * 1e9


class DecodeBookkeeping:
    """A batch of 32 decoding requests doing a decode step's allocator work (the module docstring
    lists it); finished requests (long-tailed budgets, mean ~100 tokens) make way for new prompts
    of 16-256 tokens."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = PagePool(BATCH * 64)
        self.table = BlockTable(BATCH, max_pages=64)
        self.context: dict[int, int] = {}
        self.remaining: dict[int, int] = {}
        self.next_id = 0
        for _ in range(BATCH):
            self._admit()

    def _admit(self) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        prompt = int(self.rng.integers(16, 257))
        self.table.insert(rid, self.pool.allocate(pages_needed(prompt, PAGE_SIZE)))
        self.context[rid] = prompt
        self.remaining[rid] = int(np.clip(self.rng.lognormal(4.3, 0.8), 4, 512))

    def step(self) -> None:
        ids = self.table.request_ids
        positions = np.fromiter((self.context[rid] for rid in ids), dtype=np.int64, count=len(ids))
        for row in np.flatnonzero(positions % PAGE_SIZE == 0):
            self.table.append(ids[row], self.pool.allocate(1))
        rows = self.table.as_numpy()[[self.table.row_of(rid) for rid in ids]]
        AttentionMetadata.build([1] * len(ids), positions + 1, rows, PAGE_SIZE)
        for rid in ids:
            self.context[rid] += 1
            self.remaining[rid] -= 1
            if self.remaining[rid] == 0:
                self.pool.free(self.table.remove(rid))
                del self.context[rid], self.remaining[rid]
                self._admit()


def decode_step_seconds(model, repeats: int, sync) -> float:
    """Median time of one HF decode forward at batch 32 over a dense cache of CONTEXT tokens."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        shape = (BATCH, config.num_key_value_heads, CONTEXT, head_dim)
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    tokens = torch.randint(0, config.vocab_size, (BATCH, 1))

    def step():
        model(input_ids=tokens, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the token just appended: every step sees CONTEXT tokens

    with torch.inference_mode():
        return interleaved({"decode": step}, repeats, sync)["decode"]


def scattered_pages(pool: PagePool, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` pages spread over the pool, as after much churn: no two consecutive."""
    taken = pool.allocate(pool.num_pages)
    keep = set(taken[::2][:n])
    pool.free([p for p in rng.permutation(taken).tolist() if p not in keep])
    return sorted(keep, key=lambda _: rng.random())


def swap_cases(device: torch.device, rng: np.random.Generator):
    spec = KVCacheSpec(num_layers=8, num_kv_heads=4, head_dim=64, page_size=PAGE_SIZE)
    nbytes = SWAP_PAGES * spec.bytes_per_page
    plain_src = torch.randn(nbytes // 4, device=device)
    plain_dst = torch.empty(nbytes // 4, pin_memory=device.type == "cuda")

    kernels = cpu_kernels() if device.type == "cpu" else None
    copy_pages = None if kernels is None else kernels.copy_pages  # as the model runner passes it

    def cycle(cache: KVCache, host: HostSwapPool, pages: list[int]):
        state = {"device": pages}

        def swap_out():
            plan = plan_swap_out(state["device"], host.pool)
            execute_swap(plan, cache, host, copy_pages)
            release_source(plan, cache.pool, host.pool)
            state["host"] = list(plan.host_pages)

        def swap_in():
            plan = plan_swap_in(state["host"], cache.pool)
            execute_swap(plan, cache, host, copy_pages)
            release_source(plan, cache.pool, host.pool)
            state["device"] = list(plan.device_pages)

        return swap_out, swap_in

    contiguous = KVCache(spec, 4 * SWAP_PAGES, device), HostSwapPool(spec, 4 * SWAP_PAGES)
    out_c, in_c = cycle(*contiguous, contiguous[0].pool.allocate(SWAP_PAGES))
    fragmented = KVCache(spec, 4 * SWAP_PAGES, device), HostSwapPool(spec, 4 * SWAP_PAGES)
    out_f, in_f = cycle(*fragmented, scattered_pages(fragmented[0].pool, SWAP_PAGES, rng))
    cases = {"plain copy_": lambda: plain_dst.copy_(plain_src, non_blocking=True)}
    cases |= {"swap-out (contiguous pages)": out_c, "swap-in (contiguous pages)": in_c}
    return cases | {"swap-out (scattered pages)": out_f, "swap-in (scattered pages)": in_f}, nbytes


def main() -> None:
    parser = harness.options(__doc__, threads=1, repeats=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = harness.start(parser)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    sync = synchronizer(device)
    rng = np.random.default_rng(args.seed)

    per_page = {n: alloc_free_ns_per_page(n) for n in (1, 16)}

    swaps, nbytes = swap_cases(device, rng)
    swap_seconds = interleaved(swaps, args.repeats * 3, sync, warmup=2)
    plain = swap_seconds["plain copy_"]

    sim = DecodeBookkeeping(args.seed)
    steps = 2000
    bookkeeping = time_once(lambda: [sim.step() for _ in range(steps)], lambda: None) / steps
    sim.pool.check_integrity()
    sim.table.check_integrity()
    model = AutoModelForCausalLM.from_pretrained(cached_model("llama", "small")).to(device).eval()
    decode = decode_step_seconds(model, args.repeats, sync)

    swap = {"bytes": nbytes, "pages": SWAP_PAGES, "cases": {}}
    for name, seconds in swap_seconds.items():
        case = {"ms": round(seconds * 1e3, 3), "GB/s": round(nbytes / seconds / 1e9, 2)}
        swap["cases"][name] = case | {"vs plain copy_": round(plain / seconds, 3)}
    step = {"batch": BATCH, "allocator_us_per_step": round(bookkeeping * 1e6, 1)}
    step["hf_decode_forward_ms"] = round(decode * 1e3, 2)
    step["allocator_share_of_step"] = round(bookkeeping / decode, 5)
    per_page = {f"{n} page(s) per call": round(ns, 1) for n, ns in per_page.items()}
    result = {"environment": environment(threads, device), "alloc_free_ns_per_page": per_page}
    result |= {"swap": swap, "decode_step": step}
    path = harness.write_json(f"allocator-{device.type}", result)
    rows = [{"swap": name} | case for name, case in swap["cases"].items()]
    print(*harness.markdown(rows), f"alloc_free_ns_per_page: {per_page}", sep="\n")
    print(f"decode_step: {step}\nwrote {path}")


if __name__ == "__main__":
    main()
