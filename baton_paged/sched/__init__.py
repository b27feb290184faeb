"""Scheduling: the waiting queue, the block-table scheduler, and the batching policies."""
