"""The run folder and everything that reads or writes it: the layout (``layout.py``: manifest, recipe,
``final/`` vs a checkpoint), checkpoints (``checkpoint.py``), saving and loading placements
(``save.py``), one loader for every model argument (``reference.py``), compositions of runs
(``compose.py``), exports (``export.py``) and the model card (``card.py``).

Layer: runs. Imports generate, data, placement, adapters, models, config and the foundation.
"""
