"""Load a recipe: YAML file ⊕ ``key=value`` overrides → validated :class:`Recipe`.

Overrides use dotted keys and YAML values: ``placement.language.rank=16``,
``placement.vision.targets=[q,v]``. Errors name the file, the key path and, for an unknown key, the
closest valid one.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlora.config.schema import Recipe
from mmlora.errors import MmloraError


def _yaml_problem(err: Exception) -> str:
    """A YAML error in a few words on one line: ``expected ',' or ']', but got '<stream end>' at column 4``."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at column {mark.column + 1}" if mark is not None else problem


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    import yaml

    for item in overrides:
        if "=" not in item:
            raise MmloraError(f"override {item!r} is not key=value (e.g. placement.language.rank=16)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise MmloraError(f"override {item!r}: {raw!r} is not valid YAML ({_yaml_problem(err)}); write values "
                              "as YAML (16, [q, v], {first: 1}) and quote a string that looks like YAML") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise MmloraError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the schema object at error location ``loc`` (best effort)."""
    from pydantic import BaseModel

    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _explain(err: Any, source: str) -> str:
    by_where: dict[str, list[str]] = {}
    for e in err.errors():
        # Drop union-branch tags (e.g. "literal['all']", "list[...]", "LayerRange") from the location.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper())))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
            by_where.setdefault(where, []).append(f"unknown key{hint}")
        else:
            by_where.setdefault(where, []).append(e["msg"].removeprefix("Value error, "))
    lines = []
    for where, msgs in by_where.items():
        # For a union, a validator's own message is more useful than "input should be ..." per branch.
        specific = [m for m in msgs if not m.startswith("Input should be")]
        lines.append(f"{where}: {'; '.join(dict.fromkeys(specific or msgs))}")
    # One line, whatever the number of problems: the CLI's error path is one line per failure.
    return f"{source}: invalid recipe: " + " | ".join(lines)


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    from pydantic import ValidationError

    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise MmloraError(_explain(err, source)) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read ``path`` (YAML), apply overrides, validate. Raises :class:`MmloraError` naming the problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MmloraError(f"no recipe at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise MmloraError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise MmloraError(f"{path}: a recipe is a mapping of sections (model, placement, ...)")
    return validate_recipe(apply_overrides(data, overrides), str(path))


def recipe_json_schema() -> str:
    """The JSON schema of recipes (for editors: ``# yaml-language-server: $schema=...``)."""
    return json.dumps(Recipe.model_json_schema(), indent=2, sort_keys=True) + "\n"


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in, overrides applied) as YAML, for the run folder."""
    import yaml

    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
