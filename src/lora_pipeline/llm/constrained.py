"""JSON-constrained decoding with xgrammar (maintained, works offline with transformers 5).

Two details make "every output parses" hold even for a weak model:
* ``any_whitespace=False``: otherwise a model can emit whitespace forever between tokens;
* tokens containing control characters are suppressed: xgrammar admits raw U+0000-U+001F inside strings,
  which ``json.loads`` rejects.
Without a user schema, a bounded generic object is used (up to 8 flat keys, strings up to 200 characters),
so generation always finishes inside a modest token budget.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "patternProperties": {
        "^[A-Za-z_][A-Za-z0-9_]{0,31}$": {"type": ["string", "number", "boolean", "null"], "maxLength": 200}
    },
    "additionalProperties": False,
    "maxProperties": 8,
}


class JsonConstraint:
    """Build once per (tokenizer, schema); ``generate_kwargs()`` gives fresh per-call generate() arguments."""

    def __init__(self, tokenizer, vocab_size: int, schema: dict[str, Any] | None = None):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=[tokenizer.eos_token_id])
        self._grammar = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(schema or DEFAULT_JSON_SCHEMA), any_whitespace=False)
        self._suppress = [i for i in range(len(tokenizer))
                          if any(ord(ch) < 32 for ch in tokenizer.decode([i], skip_special_tokens=True))]

    def generate_kwargs(self) -> dict[str, Any]:
        import xgrammar as xgr

        return {"logits_processor": [xgr.contrib.hf.LogitsProcessor(self._grammar)],
                "suppress_tokens": self._suppress}


def parses(text: str, schema: dict[str, Any] | None = None) -> bool:
    """Does ``text`` parse as JSON (and, given a schema, have its required keys and enum values)?"""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False
    if not schema:
        return True
    return _matches(value, schema)


def _matches(value: Any, schema: dict[str, Any]) -> bool:
    """A small JSON Schema check (type, required, properties, enum, maxLength) for reporting; xgrammar enforces."""
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if isinstance(kind, str) and kind in types and not isinstance(value, types[kind]):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        return False
    if isinstance(value, dict):
        if any(key not in value for key in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and props and set(value) - set(props):
            return False
        return all(_matches(value[k], sub) for k, sub in props.items() if k in value)
    return True
