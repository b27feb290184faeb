"""Errors raised by the allocator. Each one is raised before any state changes."""


class AllocatorError(RuntimeError):
    """Base class of every allocator error."""


class OutOfPagesError(AllocatorError):
    """Not enough free pages for a request; the pool is left exactly as it was."""

    def __init__(self, requested: int, free: int, total: int, pool: str = "page pool"):
        self.requested = requested
        self.free = free
        self.total = total
        super().__init__(f"{pool}: asked for {requested} pages, {free} of {total} are free")


class PageOwnershipError(AllocatorError):
    """A page was freed or shared that its caller does not own (double free, foreign id)."""


class IntegrityError(AllocatorError):
    """The allocator's bookkeeping contradicts itself; raised by ``check_integrity()``."""
