"""Attention over the paged KV cache (backends arrive with the attention issue)."""
