"""Serving many adapters on one base over HTTP: ``mmlora serve --base BASE --adapter NAME=RUN ...``.

``engine`` (model, adapters by mode, continuous batching, a router's picks), ``pool`` (registered runs,
the loaded budget, page-in off the decoding loop), ``gathered`` (per-layer LoRA/DoRA stacks gathered
per sample), ``full`` (per-adapter copies of fully trained modules), ``batcher`` (bounded queue, one
worker: continuous or fixed batches), ``app`` (FastAPI routes, request checks, the demo page
``page.html``), ``openai_api`` (``/v1/chat/completions``), ``local`` (a loopback server; load-test clients).

Layer: serve. Imports eval, runs, generate, data, models and the foundation.
"""
