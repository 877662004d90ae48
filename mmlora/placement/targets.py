"""Which modules a target group means: q, k, v, o, attention, mlp, all-linear, or a name pattern.

Groups are read from generic naming conventions shared across model families (an attention block's
``q_proj``/``query``/``to_q``...), never from per-model paths: a module belongs to group ``q`` when it
is a linear layer named like a query projection *inside* a module named like an attention block.
Patterns are globs on the module's name inside its modality (``layers.*.self_attn.q_proj``) or, with
a ``re:`` prefix, regular expressions; both are also tried on the full module name.
"""

from __future__ import annotations

import fnmatch
import re

from mmlora.errors import MmloraError

_ATTENTION_PARENTS = {"self_attn", "attn", "attention", "self_attention", "cross_attn", "cross_attention", "self"}
_Q = {"q_proj", "query", "q", "wq", "to_q", "q_lin"}
_K = {"k_proj", "key", "k", "wk", "to_k", "k_lin"}
_V = {"v_proj", "value", "v", "wv", "to_v", "v_lin"}
_O = {"o_proj", "out_proj", "proj", "dense", "wo", "to_out", "c_proj", "out_lin", "o"}
_QKV = {"qkv", "qkv_proj", "in_proj", "wqkv", "c_attn", "query_key_value"}
_MLP_PARENTS = {"mlp", "ffn", "feed_forward", "feedforward", "mlp_block", "intermediate"}
_MLP_LEAVES = {"fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate_up_proj"}






def groups_of(name: str) -> set[str]:
    """Target groups a linear layer named ``name`` belongs to (``attention`` and ``all-linear`` aside)."""
    parts = name.lower().split(".")
    leaf, parents = parts[-1], set(parts[:-1])
    found: set[str] = set()
    if parents & _ATTENTION_PARENTS:
        for group, names in (("q", _Q), ("k", _K), ("v", _V), ("o", _O)):
            if leaf in names:
                found.add(group)
        if leaf in _QKV:
            found |= {"q", "k", "v"}
    if not found and (parents & _MLP_PARENTS or leaf in _MLP_LEAVES):
        found.add("mlp")
    return found


def matches_group(group: str, name: str) -> bool:
    if group == "all-linear":
        return True
    groups = groups_of(name)
    if group == "attention":
        return bool(groups & {"q", "k", "v", "o"})
    return group in groups


def compile_pattern(pattern: str, where: str = "targets"):
    """A predicate for a module-name pattern: ``re:REGEX`` (full match) or a glob. An invalid regex
    is an :class:`MmloraError` naming ``where`` (the recipe key), the pattern and the regex error."""
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            at = f" at position {err.pos} of {pattern[3:]!r}" if err.pos is not None else ""
            raise MmloraError(f"{where}: pattern {pattern!r} is not a valid regular expression ({err.msg}{at}); "
                              "escape literal characters such as . ( [ with a backslash") from None
        return lambda n: regex.fullmatch(n) is not None
    return lambda n: fnmatch.fnmatchcase(n, pattern)


from mmlora.config.schema import TARGET_GROUPS  # noqa: E402  (schema is the single source of group names)

TARGET_GROUPS_SET = frozenset(TARGET_GROUPS)
