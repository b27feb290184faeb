"""Embeddings of the BATON scheduler into other serving stacks (arrive with the plugins issue)."""
