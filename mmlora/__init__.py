"""mmlora: multi-modal LoRA placement, training and evaluation for vision-language models.

Layers, bottom to top (a module imports only its own layer and those below; ``tests/layering.py``
checks every import): foundation (this package's ``errors``, ``cache``, ``optional``) → ``config`` →
``models`` → ``adapters`` → ``placement`` → ``data`` → ``generate`` → ``runs`` → ``objectives`` →
``train`` → ``eval`` → ``serve`` → ``showcase`` → ``commands`` (and ``cli``).
"""

__version__ = "0.1.0"
