"""The text the tiny presets' tokenizers are trained on, shipped as package data.

The tiny bases speak the shapes world's words, so their BPE tokenizers are trained on caption-like
sentences of that world. The sentences are stored here as data (``tokenizer_corpus.txt.gz``, written
by ``mmlora.showcase.shapes.corpus``; a test checks that they match), so that building a model never
imports the showcase.
"""

from __future__ import annotations

import gzip
from pathlib import Path

CORPUS_FILE = Path(__file__).resolve().parent / "tokenizer_corpus.txt.gz"


def tokenizer_corpus() -> list[str]:
    """The shipped tokenizer-training sentences, one per line, in order."""
    return gzip.decompress(CORPUS_FILE.read_bytes()).decode("utf-8").splitlines()
