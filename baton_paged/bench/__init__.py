"""``baton-paged bench latency|throughput|serve``: vLLM's ``vllm bench`` for a user's own
machine, shipped in the package so measuring needs no clone of the repository.

``latency`` times one batch end to end, ``throughput`` runs a whole dataset through the offline
engine, ``serve`` streams a dataset from a running server (this one or any OpenAI-compatible one)
at a request rate and reports vLLM's serving figures (TTFT, TPOT, ITL, end to end). Datasets
(``datasets.py``): random token prompts, or a ShareGPT-style JSON file. The repository's own
benchmarks (``benchmarks/``) stream from the server through the same client (``client.py``).
"""
