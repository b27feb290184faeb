"""Embeddings of the BATON scheduler in other serving stacks, and the plugin entry points.

* ``baton_paged.plugins.asgi``: the OpenAI routes as a sub-application to mount in any
  FastAPI/Starlette service.
* ``baton_paged.plugins.registry``: third-party policies and attention backends through the
  ``baton_paged.plugins`` entry-point group.
"""
