"""The CLI's subcommands, one module each (``add_arguments``, ``run``): parse, call one library
function, print. They import the library inside ``run`` so that ``mmlora --help`` stays fast.

Layer: commands. The top: it may import any layer.
"""
