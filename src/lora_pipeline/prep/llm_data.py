"""LLM training data: JSONL validation with line numbers, cleaning, split, chat formatting, loss masks.

Two input shapes per line: ``{"prompt": ..., "response": ..., "system"?: ...}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. The training target is the
final assistant turn; everything before it is prompt (masked out of the loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lora_pipeline.core.files import json_sha256, sha256_hex

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "{system}### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class Conversation:
    line: int
    messages: tuple[tuple[str, str], ...]  # (role, content); the last one is the assistant's answer

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    @property
    def response(self) -> str:
        return self.messages[-1][1]

    def key(self) -> str:
        return json_sha256(self.messages, ensure_ascii=False)


@dataclass(frozen=True)
class Reject:
    line: int
    reason: str


def parse_record(record: Any, line: int) -> Conversation:
    """One JSON value -> a Conversation, or ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        turns = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise ValueError(f"messages[{index}] needs 'role' and 'content'")
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{index}].role {message['role']!r} is not system, user or assistant")
            if not isinstance(message["content"], str) or not message["content"].strip():
                raise ValueError(f"messages[{index}].content is empty")
            turns.append((message["role"], message["content"]))
        if turns[-1][0] != "assistant":
            raise ValueError("the last message must be the assistant's answer (the training target)")
        if not any(role == "user" for role, _ in turns):
            raise ValueError("no user message")
        return Conversation(line, tuple(turns))
    missing = [key for key in ("prompt", "response") if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}; each line needs 'prompt' and 'response' "
                         f"(or 'messages')")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"'{key}' is empty")
    turns = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        turns.append(("system", record["system"]))
    turns += [("user", record["prompt"]), ("assistant", record["response"])]
    return Conversation(line, tuple(turns))


def read_jsonl(path: str | Path) -> tuple[list[Conversation], list[Reject]]:
    """Read every line; bad lines become rejects with their line number, good ones still load.

    A UTF-8 BOM is accepted, blank lines are skipped; invalid UTF-8, invalid JSON (a trailing comma, say)
    and missing or empty fields are rejected.
    """
    path = Path(path)
    good, bad = [], []
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        try:
            text = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append(Reject(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        try:
            good.append(parse_record(json.loads(text), number))
        except json.JSONDecodeError as exc:
            bad.append(Reject(number, f"invalid JSON: {exc.msg} at column {exc.colno}"))
        except ValueError as exc:
            bad.append(Reject(number, str(exc)))
    return good, bad


def render_prompt(tokenizer, prompt_messages: Sequence[dict[str, str]], template: str | None) -> str:
    """The prompt text up to where the answer starts: the tokenizer's chat template, else ``template``."""
    if template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt_messages), add_generation_prompt=True, tokenize=False)
    system = "".join(m["content"] + "\n\n" for m in prompt_messages if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in prompt_messages if m["role"] != "system")
    return (template or DEFAULT_TEMPLATE).format(system=system, prompt=user)


def prompt_ids(tokenizer, prompt_messages: Sequence[dict[str, str]], template: str | None) -> list[int]:
    """The one prompt formatting for training, evaluation and generation: template, then BOS first (once)."""
    ids = tokenizer(render_prompt(tokenizer, prompt_messages, template), add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def user_prompt(text: str, system: str | None = None) -> list[dict[str, str]]:
    """A bare prompt string as chat messages (what generation and the JSON prompts start from)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def tokenize(tokenizer, conversation: Conversation, template: str | None, max_length: int, overlong: str
             ) -> dict[str, Any] | None:
    """input_ids + labels (prompt tokens = -100) + attention mask, and ``truncated_from`` (the full length in
    tokens when it was cut to ``max_length``, else 0). Returns None for an overlong one with ``overlong: reject``."""
    prompt = prompt_ids(tokenizer, conversation.prompt_messages, template)
    answer_ids = tokenizer(conversation.response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    full_length = len(prompt) + len(answer_ids)
    prompt_ids_ = prompt
    if full_length > max_length:
        if overlong == "reject":
            return None
        # Keep the start of the answer: drop the oldest prompt tokens first, then cut the answer's end.
        keep_prompt = max(min(len(prompt_ids_), max_length // 2), max_length - len(answer_ids))
        prompt_ids_ = prompt_ids_[-keep_prompt:]
        answer_ids = answer_ids[: max_length - len(prompt_ids_)]
    ids = prompt_ids_ + answer_ids
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids_) + answer_ids,
            "attention_mask": [1] * len(ids), "truncated_from": full_length if full_length > max_length else 0}


def dedupe(conversations: Sequence[Conversation]) -> tuple[list[Conversation], list[Reject]]:
    seen: dict[str, int] = {}
    kept, dropped = [], []
    for conv in conversations:
        key = conv.key()
        if key in seen:
            dropped.append(Reject(conv.line, f"duplicate of line {seen[key]}"))
        else:
            seen[key] = conv.line
            kept.append(conv)
    return kept, dropped


def split_position(conversation: Conversation, salt: str) -> float:
    """Where an example falls in [0, 1): a hash of its normalized prompt (whitespace collapsed) and ``salt``.

    It depends on nothing else, so appending lines never moves an existing example between train and
    validation, and the same prompt asked twice (with different answers) lands on one side only."""
    prompt = " ".join(" ".join(c.split()) for _, c in conversation.messages[:-1])
    return int(sha256_hex(f"{salt}\0{prompt}", 16), 16) / 2**64  # the digest's first 8 bytes


def split(conversations: Sequence[Conversation], validation_fraction: float, salt: str
          ) -> tuple[list[Conversation], list[Conversation]]:
    """Stable split: an example is validation when its :func:`split_position` is below the fraction."""
    validation = [c for c in conversations if split_position(c, salt) < validation_fraction]
    chosen = {id(c) for c in validation}
    return [c for c in conversations if id(c) not in chosen], validation


def pad_batch(items: Sequence[dict[str, list[int]]], pad_id: int):
    """Right-pad a batch; padding gets attention 0 and label -100."""
    import torch

    width = max(len(item["input_ids"]) for item in items)
    def pad(key, value):
        return torch.tensor([item[key] + [value] * (width - len(item[key])) for item in items])
    return {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": pad("attention_mask", 0)}


def pack(items: Sequence[dict[str, list[int]]], length: int) -> list[dict[str, list[int]]]:
    """Greedy packing of tokenized samples into rows of at most ``length`` tokens (order kept).

    Each row remembers its segments, so the collate step can build a block-diagonal causal mask and restart
    position ids: a sample never attends to the one packed before it.
    """
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "segments": []}
    for item in items:
        n = len(item["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "segments": []}
        current["input_ids"] += item["input_ids"]
        current["labels"] += item["labels"]
        current["segments"].append(n)
    if current["input_ids"]:
        rows.append(current)
    return rows


def pad_packed_batch(rows: Sequence[dict[str, list[int]]], pad_id: int):
    """Packed rows -> input_ids, labels, position_ids and a 4D boolean mask (block-diagonal and causal)."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment_of = torch.full((len(rows), width), -1)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[r, :n] = torch.tensor(row["input_ids"])
        labels[r, :n] = torch.tensor(row["labels"])
        start = 0
        for s, size in enumerate(row["segments"]):
            positions[r, start:start + size] = torch.arange(size)
            segment_of[r, start:start + size] = s
            start += size
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment_of[:, :, None] == segment_of[:, None, :]
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only: no NaN rows
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}
