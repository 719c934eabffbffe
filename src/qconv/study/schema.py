"""results.json's schema (results.schema.json beside this file) and a small validator.

The validator implements the subset of JSON Schema (2020-12) the schema uses — type (string or
list), properties, required, additionalProperties (bool or schema), items, enum, const, minimum,
$ref to "#/$defs/..." — so that qconv needs no jsonschema dependency. ``validate`` returns a
list of error strings (empty: valid).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_KNOWN = {"$schema", "$id", "$defs", "title", "description", "type", "properties", "required",
          "additionalProperties", "items", "enum", "const", "minimum", "$ref", "examples"}


def load_schema() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("results.schema.json").read_text())


def validate(doc: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Errors of `doc` against `schema` (default: the results schema), as 'path: problem' strings."""
    root = load_schema() if schema is None else schema
    errors: list[str] = []
    _check(doc, root, root, "$", errors)
    return errors


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, got {ref}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _check(v: Any, s: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    unknown = set(s) - _KNOWN
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} at {path} are not supported by this validator")
    if "$ref" in s:
        _check(v, _resolve(s["$ref"], root), root, path, errors)
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_TYPES[t](v) for t in types):
            errors.append(f"{path}: expected {'/'.join(types)}, got {type(v).__name__} {v!r:.60}")
            return
    if "const" in s and v != s["const"]:
        errors.append(f"{path}: expected {s['const']!r}, got {v!r:.60}")
    if "enum" in s and v not in s["enum"]:
        errors.append(f"{path}: {v!r:.60} is not one of {s['enum']}")
    if "minimum" in s and _TYPES["number"](v) and v < s["minimum"]:
        errors.append(f"{path}: {v} < minimum {s['minimum']}")
    if isinstance(v, dict):
        props = s.get("properties", {})
        for k in s.get("required", []):
            if k not in v:
                errors.append(f"{path}: missing required key {k!r}")
        for k, item in v.items():
            if k in props:
                _check(item, props[k], root, f"{path}.{k}", errors)
            else:
                extra = s.get("additionalProperties", True)
                if extra is False:
                    errors.append(f"{path}: unexpected key {k!r}")
                elif isinstance(extra, dict):
                    _check(item, extra, root, f"{path}.{k}", errors)
    if isinstance(v, list) and "items" in s:
        for i, item in enumerate(v):
            _check(item, s["items"], root, f"{path}[{i}]", errors)
