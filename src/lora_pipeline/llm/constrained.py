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


def schema_errors(text: str, schema: dict[str, Any] | None = None) -> str:
    """Why ``text`` is not a valid answer: not JSON, or the first JSON Schema violation (the ``jsonschema``
    library: types, integer vs number, ranges, items, maxItems, required, enum, additionalProperties ...);
    ``""`` when it is valid."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        return f"not JSON ({exc})"
    if not schema:
        return ""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return ""
    where = "/".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def parses(text: str, schema: dict[str, Any] | None = None) -> bool:
    """Does ``text`` parse as JSON and, given a schema, validate against it?"""
    return not schema_errors(text, schema)


def check_schema(schema: dict[str, Any] | None) -> None:
    """Fail early on a schema that is not valid JSON Schema (the message names the problem)."""
    if schema:
        import jsonschema

        from lora_pipeline.core.errors import ConfigError

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise ConfigError(f"llm_eval.json_schema is not a valid JSON Schema: {exc.message}") from None
