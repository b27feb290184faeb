"""baton-paged: BATON dynamic re-batching on a paged KV cache.

Importing the package is cheap: torch and transformers load only when a component that needs
them is imported (``baton_paged.allocator``, the model builder, the CLI's subcommands).
"""

__version__ = "0.1.0"
