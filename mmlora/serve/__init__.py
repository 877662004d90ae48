"""Serving many adapters on one base over HTTP: ``mmlora serve --base BASE --adapter NAME=RUN ...``.

``engine`` (model, lazy LRU adapters, mixed / switch / merged batches), ``batcher`` (bounded queue,
one worker), ``app`` (FastAPI routes, request checks, the demo page ``page.html``).

Layer: serve. Imports eval, runs, generate, data, models and the foundation.
"""
