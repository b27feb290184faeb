"""Property-based tests of the paged KV allocator, driven by hypothesis.

The stateful test plays random sequences of requests ("owners") against a small device
``KVCache``, a ``HostSwapPool`` of the same geometry and a ``BlockTable``: allocate, fork a shared
prefix, free, engine iterations that swap some owners out and others back in under the page-reuse
rule the engine follows (device pages of a swap-out reused in the same iteration), insert/grow/
remove block-table rows, and misuse (out of pages, double free, foreign ids, over-free, fork of a
free page, rejected table inserts/appends). The test
keeps its own model of who owns which page and what every page must hold, and after every step
checks that

* both pools pass ``check_integrity()`` and every page's reference count is exactly the number of
  live owners holding it (pages nobody holds are free; ``num_free`` + held == ``num_pages``);
* every owner's pages hold, byte for byte, the random K/V written when they were allocated, on
  the device or in the host pool, although freed pages are overwritten with NaN garbage;
* the block table holds exactly the model's rows, in the model's order (removal moves the last row
  into the hole), each row equal to its owner's device pages;
* every rejected operation raised its documented error and left pools and table exactly as they
  were (counts and the free list's order);
* freeing every live owner at the end returns both pools to all-free.

Plain ``@given`` tests check ``coalesce_runs`` (every pair once, runs consecutive on both sides and
as few as the sorted order allows), a swap out/in round trip of random scattered pages (byte-exact,
no write outside the destination pages), the slot helpers against a per-position computation, and
that a freed run is the next one handed out, in order.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from baton_paged.allocator import (
    BlockTable,
    CopyRun,
    HostSwapPool,
    KVCache,
    KVCacheSpec,
    OutOfPagesError,
    PageOwnershipError,
    PagePool,
    SwapDirection,
    SwapPlan,
    coalesce_runs,
    execute_swap,
    plan_swap_in,
    plan_swap_out,
    release_source,
    slot_mapping,
)
from baton_paged.model.runner import ModelRunner
from baton_paged.sched.plan import StepPlan

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype=torch.float32)
GARBAGE = float("nan")
PAGE_NUMEL = math.prod(SPEC.page_shape)


def pool_state(pool: PagePool) -> tuple:
    """Everything an error must leave alone: counts, and the free list with its order."""
    refs = [pool.ref_count(p) for p in range(pool.num_pages)]
    return pool.num_free, refs, list(pool._free)


def table_state(table: BlockTable) -> tuple:
    ids = table.request_ids
    return ids, [table.pages(rid) for rid in ids], table.as_numpy().tolist()


def random_pages(gen: torch.Generator, n: int, stamp: int) -> torch.Tensor:
    """``n`` pages of random K/V; element 0 of each page holds a unique stamp so no two match."""
    data = torch.randn(n, *SPEC.page_shape, generator=gen, dtype=SPEC.dtype)
    data.view(n, PAGE_NUMEL)[:, 0] = torch.arange(stamp, stamp + n, dtype=SPEC.dtype)
    return data


@dataclass
class Owner:
    """A request: its pages (device ones, or host ones while swapped out) and their contents."""

    on_device: bool
    pages: list[int]
    data: list[torch.Tensor]


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache: KVCache | None = None
        self.owners: dict[int, Owner] = {}
        self.rows: list[int] = []  # the block table's request ids, in row order
        self.dead: dict[bool, list[list[int]]] = {True: [], False: []}  # freed owners' pages
        self.next_id = 0
        self.stamp = 1
        self.checked = True  # the last step passed the invariants (teardown checks only then)

    @initialize(
        num_device=st.integers(12, 24),
        num_host=st.integers(8, 16),
        max_rows=st.integers(2, 5),
        max_pages=st.integers(3, 8),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, num_device, num_host, max_rows, max_pages, seed):
        self.cache = KVCache(SPEC, num_device)
        self.host = HostSwapPool(SPEC, num_host, pin_memory=False)
        self.table = BlockTable(max_rows, max_pages)
        self.gen = torch.Generator().manual_seed(seed)

    # ----------------------------------------------------------------------------- helpers

    def _begin(self) -> None:
        self.checked = False

    def _pool(self, on_device: bool) -> PagePool:
        return self.cache.pool if on_device else self.host.pool

    def _storage(self, on_device: bool) -> torch.Tensor:
        return self.cache.storage if on_device else self.host.storage

    def _state(self) -> tuple:
        return pool_state(self.cache.pool), pool_state(self.host.pool), table_state(self.table)

    def _counts(self, on_device: bool) -> Counter:
        """How many live owners hold each page of one pool, according to the model."""
        counts: Counter = Counter()
        for owner in self.owners.values():
            if owner.on_device == on_device:
                counts.update(owner.pages)
        return counts

    def _ids(self, on_device: bool | None = None) -> list[int]:
        return sorted(
            oid for oid, o in self.owners.items() if on_device is None or o.on_device == on_device
        )

    def _new_owner(self, owner: Owner) -> int:
        oid = self.next_id
        self.next_id += 1
        self.owners[oid] = owner
        return oid

    def _fill(self, pages: list[int]) -> list[torch.Tensor]:
        """Write fresh random K/V into newly allocated device ``pages``; return what was written."""
        data = random_pages(self.gen, len(pages), self.stamp)
        self.stamp += len(pages)
        if pages:
            self.cache.storage[pages] = data
        return [page.clone() for page in data]

    def _trash_if_free(self, on_device: bool, pages) -> None:
        """Overwrite the pages nobody owns any more, so a stale reference would read garbage."""
        pool, storage = self._pool(on_device), self._storage(on_device)
        for page in pages:
            if pool.ref_count(page) == 0:
                storage[page].fill_(GARBAGE)

    def _table_remove(self, oid: int) -> None:
        pages = self.table.remove(oid)
        assert pages == self.owners[oid].pages
        hole = self.rows.index(oid)
        self.rows[hole] = self.rows[-1]
        self.rows.pop()

    def _drop(self, oid: int) -> None:
        owner = self.owners.pop(oid)
        self.dead[owner.on_device] = [*self.dead[owner.on_device][-7:], owner.pages]

    # ------------------------------------------------------------------------ normal use

    @rule(n=st.one_of(st.integers(0, 6), st.integers(7, 30)))
    def allocate(self, n):
        self._begin()
        pool = self.cache.pool
        if n > pool.num_free:
            before = self._state()
            with pytest.raises(OutOfPagesError) as err:
                pool.allocate(n)
            assert (err.value.requested, err.value.free) == (n, before[0][0])
            assert err.value.total == pool.num_pages
            assert self._state() == before
            return
        free_before = pool.num_free
        pages = pool.allocate(n)
        assert len(pages) == n == len(set(pages)) and pool.num_free == free_before - n
        counts = self._counts(True)
        assert not any(counts[p] for p in pages), f"allocate handed out owned pages {pages}"
        self._new_owner(Owner(True, pages, self._fill(pages)))

    @precondition(lambda self: self._ids(True))
    @rule(data=st.data())
    def fork(self, data):
        self._begin()
        oid = data.draw(st.sampled_from(self._ids(True)), label="owner")
        owner = self.owners[oid]
        shared = self.cache.pool.fork(owner.pages)
        assert shared == owner.pages and shared is not owner.pages
        # A shared prefix is read-only, so the fork expects exactly the same contents.
        self._new_owner(Owner(True, shared, list(owner.data)))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        self._begin()
        oid = data.draw(st.sampled_from(self._ids()), label="owner")
        owner = self.owners[oid]
        if oid in self.table:
            self._table_remove(oid)
        self._pool(owner.on_device).free(owner.pages)
        self._drop(oid)
        self._trash_if_free(owner.on_device, owner.pages)

    @rule(data=st.data())
    def iteration(self, data):
        """One engine iteration's swaps, under the page-reuse rule (allocator/swap.py): each
        swap-out releases its device pages as it is planned, so swap-ins and a newcomer may be
        handed those very pages; the runner issues every out, then every in, then the forward
        writes the newcomer's K/V; swap-ins' host pages are released once the copies are issued.
        Some owners swapped out share pages with others (a shared prefix): those stay owned."""
        self._begin()
        device, host = self.cache.pool, self.host.pool
        leaving = self._some(data, self._ids(True), "leaving")
        returning = self._some(data, self._ids(False), "returning")
        outs = [self._plan_out(oid) for oid in leaving]
        ins = [self._plan_in(oid) for oid in returning]
        newcomer = device.allocate(data.draw(st.integers(0, device.num_free), label="newcomer"))
        runner = ModelRunner(None, self.cache, None, self.host)
        runner.swap(
            StepPlan(
                (), swap_out=tuple(p for _, p in outs if p), swap_in=tuple(p for _, p in ins if p)
            )
        )
        self._new_owner(Owner(True, newcomer, self._fill(newcomer)))  # the forward's writes
        for oid, plan in outs:
            if plan is not None:
                self._trash_if_free(True, plan.device_pages)
                self.owners[oid].on_device, self.owners[oid].pages = False, list(plan.host_pages)
        for oid, plan in ins:
            if plan is not None:
                release_source(plan, device, host)
                self._trash_if_free(False, plan.host_pages)
                self.owners[oid].on_device, self.owners[oid].pages = True, list(plan.device_pages)

    @staticmethod
    def _some(data, ids: list[int], label: str) -> list[int]:
        return (
            data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=3), label) if ids else []
        )

    def _plan_out(self, oid: int) -> tuple[int, SwapPlan | None]:
        """Plan a swap-out as the scheduler does: host pages reserved, device pages released at
        once; None (and nothing changed) when the host pool lacks room."""
        owner = self.owners[oid]
        if len(owner.pages) > self.host.pool.num_free:
            before = self._state()
            with pytest.raises(OutOfPagesError):
                plan_swap_out(owner.pages, self.host.pool)
            assert self._state() == before
            return oid, None
        plan = plan_swap_out(owner.pages, self.host.pool)
        assert plan.direction is SwapDirection.OUT and plan.device_pages == tuple(owner.pages)
        host_counts = self._counts(False)
        assert not any(host_counts[p] for p in plan.host_pages), "swap reserved owned host pages"
        if oid in self.table:
            self._table_remove(oid)
        release_source(plan, self.cache.pool, self.host.pool)
        owner.pages = []  # held by nobody until the copy lands; its data is what it must carry
        return oid, plan

    def _plan_in(self, oid: int) -> tuple[int, SwapPlan | None]:
        """Plan a swap-in: device pages reserved (maybe ones a swap-out just released), the host
        pages held until the copies are issued; None when the device pool lacks room."""
        owner = self.owners[oid]
        if len(owner.pages) > self.cache.pool.num_free:
            before = self._state()
            with pytest.raises(OutOfPagesError):
                plan_swap_in(owner.pages, self.cache.pool)
            assert self._state() == before
            return oid, None
        plan = plan_swap_in(owner.pages, self.cache.pool)
        assert plan.direction is SwapDirection.IN and plan.host_pages == tuple(owner.pages)
        device_counts = self._counts(True)
        assert not any(device_counts[p] for p in plan.device_pages), "swap-in onto owned pages"
        return oid, plan

    # ----------------------------------------------------------------------- block table

    def _insertable(self) -> list[int]:
        return [
            oid
            for oid in self._ids(True)
            if oid not in self.table and len(self.owners[oid].pages) <= self.table.max_pages
        ]

    @precondition(lambda self: len(self.rows) < self.table.max_rows and self._insertable())
    @rule(data=st.data())
    def table_insert(self, data):
        self._begin()
        oid = data.draw(st.sampled_from(self._insertable()), label="owner")
        assert self.table.insert(oid, self.owners[oid].pages) == len(self.rows)
        self.rows.append(oid)

    def _rejected_inserts(self) -> list[tuple[str, int]]:
        full = len(self.rows) == self.table.max_rows
        cases = []
        for oid in self._ids(True):
            if oid in self.table:
                cases.append(("already in the block table", oid))
            elif full:
                cases.append(("full", oid))
            elif len(self.owners[oid].pages) > self.table.max_pages:
                cases.append(("a row holds", oid))
        return cases

    @precondition(lambda self: self._rejected_inserts())
    @rule(data=st.data())
    def table_insert_rejected(self, data):
        self._begin()
        message, oid = data.draw(st.sampled_from(self._rejected_inserts()), label="case")
        before = self._state()
        with pytest.raises(ValueError, match=message):
            self.table.insert(oid, self.owners[oid].pages)
        assert self._state() == before

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), n=st.integers(0, 4))
    def table_append(self, data, n):
        """The request's context grew: allocate pages and append them to its row."""
        self._begin()
        oid = data.draw(st.sampled_from(sorted(self.rows)), label="owner")
        owner, pool = self.owners[oid], self.cache.pool
        before = self._state()
        if n > pool.num_free:
            with pytest.raises(OutOfPagesError):
                pool.allocate(n)
            assert self._state() == before
            return
        pages = pool.allocate(n)
        if len(owner.pages) + n > self.table.max_pages:
            with pytest.raises(ValueError, match="a row holds"):
                self.table.append(oid, pages)
            pool.free(pages)
            # Allocating and freeing a run restores the free list exactly (LIFO, same order).
            assert self._state() == before
            return
        self.table.append(oid, pages)
        owner.pages.extend(pages)
        owner.data.extend(self._fill(pages))

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def table_remove(self, data):
        self._begin()
        self._table_remove(data.draw(st.sampled_from(sorted(self.rows)), label="owner"))

    # ---------------------------------------------------------------------------- misuse

    def _owned_subset(self, data, counts: Counter) -> list[int]:
        """A few distinct owned pages, each once: valid to free or fork on their own."""
        return data.draw(
            st.lists(st.sampled_from(sorted(counts)), unique=True, max_size=4), label="owned"
        )

    @rule(data=st.data(), on_device=st.booleans())
    def misuse(self, data, on_device):
        """One rejected pool call (double free, foreign id, over-free, fork of a free page).

        A single rule for all of them, so misuse is one step in a dozen rather than a third.
        """
        self._begin()
        pool, counts = self._pool(on_device), self._counts(on_device)
        kinds = ["foreign page"]
        if pool.num_free:
            kinds += ["double free", "fork of a free page"]
        if counts:
            kinds.append("over-free")
        kind = data.draw(st.sampled_from(kinds), label="kind")
        before = self._state()
        if kind == "double free":
            pages = self._double_free_pages(data, on_device, counts)
            call, message = "free", "already free"
        elif kind == "fork of a free page":
            pages = self._with_free_page(data, pool, counts)
            call, message = "fork", "it is free"
        elif kind == "over-free":
            page = data.draw(st.sampled_from(sorted(counts)), label="page")
            times = counts[page] + data.draw(st.integers(1, 2), label="extra")
            others = [p for p in self._owned_subset(data, counts) if p != page]
            pages = data.draw(st.permutations([page] * times + others), label="pages")
            call, message = "free", f"freed {times} times but has only {counts[page]} owners"
        else:
            bad = data.draw(st.one_of(st.integers(-40, -1), st.integers(0, 40)), label="bad")
            page = bad if bad < 0 else pool.num_pages + bad
            owned = self._owned_subset(data, counts) if counts else []
            pages = data.draw(st.permutations([*owned, page]), label="pages")
            call = data.draw(st.sampled_from(["free", "fork"]), label="call")
            message = "does not belong"
        with pytest.raises(PageOwnershipError, match=message):
            getattr(pool, call)(pages)
        assert self._state() == before, f"{kind} changed the allocator"

    def _with_free_page(self, data, pool: PagePool, counts: Counter) -> list[int]:
        """A free page mixed, at a random position, into a few owned ones."""
        unowned = [p for p in range(pool.num_pages) if counts[p] == 0]
        pages = [data.draw(st.sampled_from(unowned), label="free page")]
        if counts:
            pages += self._owned_subset(data, counts)
        return data.draw(st.permutations(pages), label="pages")

    def _double_free_pages(self, data, on_device: bool, counts: Counter) -> list[int]:
        """A freed owner's page list (some of it still free), or a free page among owned ones."""
        stale = [pages for pages in self.dead[on_device] if any(counts[p] == 0 for p in pages)]
        if stale and data.draw(st.booleans(), label="a freed owner's pages"):
            return data.draw(st.sampled_from(stale), label="freed owner")
        return self._with_free_page(data, self._pool(on_device), counts)

    # ------------------------------------------------------------------------ invariants

    @precondition(lambda self: self.cache is not None)
    @invariant()
    def consistent(self):
        for on_device in (True, False):
            pool, counts = self._pool(on_device), self._counts(on_device)
            pool.check_integrity()
            refs = [pool.ref_count(p) for p in range(pool.num_pages)]
            expected = [counts[p] for p in range(pool.num_pages)]
            assert refs == expected, f"{pool.name}: ref counts {refs}, owners hold {expected}"
            assert pool.num_free + len(counts) == pool.num_pages
        for oid, owner in self.owners.items():
            assert len(set(owner.pages)) == len(owner.pages) == len(owner.data)
            storage = self._storage(owner.on_device)
            for page, expected in zip(owner.pages, owner.data, strict=True):
                assert torch.equal(storage[page], expected), (
                    f"owner {oid}: {'device' if owner.on_device else 'host'} page {page} changed"
                )
        self.table.check_integrity()
        assert self.table.request_ids == self.rows and len(self.table) == len(self.rows)
        rows = self.table.as_numpy()
        assert rows.shape == (len(self.rows), self.table.max_pages) and rows.dtype == np.int32
        for row, oid in enumerate(self.rows):
            pages = self.owners[oid].pages
            assert self.owners[oid].on_device, f"swapped-out owner {oid} is in the block table"
            assert self.table.row_of(oid) == row and self.table.num_pages(oid) == len(pages)
            assert self.table.pages(oid) == pages
            assert rows[row].tolist() == pages + [0] * (self.table.max_pages - len(pages))
        self.checked = True

    def teardown(self):
        # Only after a step that passed: a teardown failure would hide the step's own error.
        if self.cache is None or not self.checked:
            return
        for oid in list(self.rows):
            self._table_remove(oid)
        for oid in self._ids():
            owner = self.owners[oid]
            self._pool(owner.on_device).free(owner.pages)
            self._drop(oid)
        assert len(self.table) == 0
        self.table.check_integrity()
        for pool in (self.cache.pool, self.host.pool):
            pool.check_integrity()
            assert pool.num_free == pool.num_pages and pool.num_used == 0
            assert all(pool.ref_count(p) == 0 for p in range(pool.num_pages))


AllocatorMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None
)
TestAllocatorMachine = AllocatorMachine.TestCase


# -------------------------------------------------------------------------- plain properties


@st.composite
def page_pairs(draw):
    """Unique source and destination page lists of one length, often with long common runs."""
    n = draw(st.integers(0, 24))
    if draw(st.booleans()):
        base = draw(st.integers(0, 8))
        src = draw(st.permutations(range(base, base + n)))
    else:
        src = draw(st.lists(st.integers(0, 47), min_size=n, max_size=n, unique=True))
    if draw(st.booleans()):
        shift = draw(st.integers(0, 20))
        dst = [s + shift for s in src]
        for i, j in (
            draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3))
            if n
            else []
        ):
            dst[i], dst[j] = dst[j], dst[i]
    else:
        dst = draw(st.lists(st.integers(0, 47), min_size=n, max_size=n, unique=True))
    return src, dst


@settings(max_examples=300, deadline=None)
@given(page_pairs())
def test_coalesce_runs_cover_every_pair_once_in_minimal_runs(pairs):
    src, dst = pairs
    runs = coalesce_runs(src, dst)
    assert all(isinstance(run, CopyRun) and run.length >= 1 for run in runs)
    expanded = [(r.src_start + i, r.dst_start + i) for r in runs for i in range(r.length)]
    # Every pair exactly once, and the runs walk the pairs in source order.
    assert expanded == sorted(zip(src, dst, strict=True))
    for a, b in zip(runs, runs[1:], strict=False):
        assert not (
            b.src_start == a.src_start + a.length and b.dst_start == a.dst_start + a.length
        ), f"runs {a} and {b} could be one copy"
    ordered = sorted(zip(src, dst, strict=True))
    breaks = sum(
        1
        for (s0, d0), (s1, d1) in zip(ordered, ordered[1:], strict=False)
        if (s1, d1) != (s0 + 1, d0 + 1)
    )
    assert len(runs) == (breaks + 1 if ordered else 0)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_swap_round_trip_of_scattered_pages_is_byte_exact(data, seed):
    num_device, num_host = 16, 12
    request = data.draw(
        st.lists(st.integers(0, num_device - 1), unique=True, max_size=num_host), label="request"
    )
    host_free = data.draw(
        st.lists(st.integers(0, num_host - 1), unique=True, min_size=len(request)),
        label="host pages freed",
    )
    cache, host = KVCache(SPEC, num_device), HostSwapPool(SPEC, num_host, pin_memory=False)
    # The device pool owns exactly the request's pages; the host pool has scattered holes.
    cache.pool.allocate(num_device)
    others = [p for p in range(num_device) if p not in request]
    cache.pool.free(data.draw(st.permutations(others), label="device pages freed"))
    host.pool.allocate(num_host)
    host.pool.free(host_free)
    contents = random_pages(torch.Generator().manual_seed(seed), len(request), 1)
    if request:
        cache.storage[request] = contents
    host.storage.fill_(GARBAGE)

    out = plan_swap_out(request, host.pool)
    assert out.device_pages == tuple(request) and set(out.host_pages) <= set(host_free)
    execute_swap(out, cache, host)
    release_source(out, cache.pool, host.pool)
    assert cache.pool.num_free == num_device
    assert host.pool.num_used == num_host - len(host_free) + len(request)
    for host_page, expected in zip(out.host_pages, contents, strict=True):
        assert torch.equal(host.storage[host_page], expected)
    untouched = [p for p in range(num_host) if p not in out.host_pages]
    assert host.storage[untouched].isnan().all(), "swap-out wrote outside its host pages"
    cache.storage.fill_(GARBAGE)

    back = plan_swap_in(out.host_pages, cache.pool)
    execute_swap(back, cache, host)
    release_source(back, cache.pool, host.pool)
    assert cache.pool.num_used == len(request)
    assert host.pool.num_used == num_host - len(host_free)
    for device_page, expected in zip(back.device_pages, contents, strict=True):
        assert torch.equal(cache.storage[device_page], expected)
    untouched = [p for p in range(num_device) if p not in back.device_pages]
    assert cache.storage[untouched].isnan().all(), "swap-in wrote outside its device pages"
    cache.check_integrity()
    host.check_integrity()


def test_swap_outs_are_issued_before_swap_ins_that_reuse_their_pages():
    """Why the runner issues every swap-out first: a swap-in planned in the same iteration lands
    on the very device pages a swap-out released at planning (the pool is LIFO)."""
    gen = torch.Generator().manual_seed(0)
    cache, host = KVCache(SPEC, 2), HostSwapPool(SPEC, 4, pin_memory=False)
    leaving, arriving = random_pages(gen, 2, 1), random_pages(gen, 2, 10)
    cache.storage[cache.pool.allocate(2)] = leaving
    host.storage[host.pool.allocate(2)] = arriving
    out = plan_swap_out([0, 1], host.pool)
    release_source(out, cache.pool, host.pool)
    back = plan_swap_in([0, 1], cache.pool)
    assert back.device_pages == (0, 1), "the released pages are handed out again at once"

    ModelRunner(None, cache, None, host).swap(StepPlan((), swap_out=(out,), swap_in=(back,)))

    assert torch.equal(host.storage[list(out.host_pages)], leaving)
    assert torch.equal(cache.storage[[0, 1]], arriving)
    execute_swap(back, cache, host)  # had the swap-in gone first, the swap-out would read this
    execute_swap(out, cache, host)
    assert torch.equal(host.storage[list(out.host_pages)], arriving)


@st.composite
def request_positions(draw):
    page_size = draw(st.integers(1, 6))
    pages = draw(st.lists(st.integers(0, 63), unique=True, max_size=8))
    end = draw(st.integers(0, len(pages) * page_size))
    start = draw(st.integers(0, end))
    return pages, start, end, page_size


@settings(max_examples=200, deadline=None)
@given(request_positions(), st.integers(1, 5))
def test_slot_mapping_matches_per_position_computation(case, overshoot):
    pages, start, end, page_size = case
    table = np.array([pages or [0]])
    slots = slot_mapping(table, [start], [end], page_size)
    naive = [pages[pos // page_size] * page_size + pos % page_size for pos in range(start, end)]
    assert slots.dtype == np.int64 and slots.tolist() == naive
    with pytest.raises(ValueError, match="do not fit"):
        slot_mapping(table, [start], [max(len(pages), 1) * page_size + overshoot], page_size)
    if end > 0:
        with pytest.raises(ValueError, match="start <= end"):
            slot_mapping(table, [end], [end - 1], page_size)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), page_size=st.integers(1, 6))
def test_decode_slots_match_per_row_computation(data, page_size):
    rows = data.draw(
        st.lists(st.lists(st.integers(0, 63), unique=True, min_size=1, max_size=6), max_size=5)
    )
    table = BlockTable(max_rows=5, max_pages=6)
    for i, pages in enumerate(rows):
        table.insert(i, pages)
    positions = [data.draw(st.integers(0, len(pages) * page_size - 1)) for pages in rows]
    positions = np.array(positions, dtype=np.int64)
    slots = slot_mapping(table.as_numpy(), positions, positions + 1, page_size)
    naive = [
        pages[pos // page_size] * page_size + pos % page_size
        for pages, pos in zip(rows, positions, strict=True)
    ]
    assert slots.tolist() == naive


@settings(max_examples=50, deadline=None)
@given(case=request_positions(), seed=st.integers(0, 2**32 - 1))
def test_written_slots_read_back_through_the_pages(case, seed):
    pages, _, end, _ = case
    pages = [p % 16 for p in pages]
    pages = list(dict.fromkeys(pages))  # unique after folding into a 16-page cache
    end = min(end, len(pages) * SPEC.page_size)
    cache = KVCache(SPEC, 16)
    gen = torch.Generator().manual_seed(seed)
    kv_shape = (end, SPEC.num_kv_heads, SPEC.head_dim)
    key, value = torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)
    table = np.array([pages or [0]])
    slots = torch.from_numpy(slot_mapping(table, [0], [end], SPEC.page_size))
    cache.write(1, slots, key, value)
    index = torch.tensor(pages, dtype=torch.int64)
    keys = cache.key(1)[index].flatten(0, 1)[:end]
    values = cache.value(1)[index].flatten(0, 1)[:end]
    assert torch.equal(keys, key) and torch.equal(values, value)
    others = [p for p in range(16) if p not in pages]
    assert not cache.storage[others].any() and not cache.storage[:, 0].any()


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    data=st.data(),
)
def test_a_freed_run_is_the_next_one_handed_out_in_order(sizes, data):
    pool = PagePool(sum(sizes) + data.draw(st.integers(0, 4), label="spare"))
    chunks = [pool.allocate(n) for n in sizes]
    assert sorted(p for chunk in chunks for p in chunk) == list(range(sum(sizes)))
    chosen = data.draw(st.sampled_from(chunks), label="freed")
    before_free = pool_state(pool)
    pool.free(chosen)
    assert pool.allocate(len(chosen)) == chosen
    assert pool_state(pool) == before_free
