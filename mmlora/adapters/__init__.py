"""mmlora's own layers, where PEFT has none: INT4 group-wise linear layers (``int4``), QA-LoRA
(``qalora``: a group-pooled adapter that merges into the INT4 zero points), lean DoRA (``lean_dora``:
PEFT's DoRA variant with the weight norm in fewer ops), a mixture of LoRA experts with a per-sample
router (``mixture``); ``parts`` reads a PEFT LoRA folder as plain per-layer parts.

Layer: adapters. Imports models, config and the foundation.
"""
