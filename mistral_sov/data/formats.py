"""The three row formats msov accepts, and the one record form every later stage sees.

Each `check_*` function both validates a raw row and normalises it, so the rules for what a field may hold
live in exactly one place. They return `(record, problems)`: the record only when problems is empty.
Problems are `(field, what is wrong)` pairs; the loader adds the file and line.
"""

from __future__ import annotations

import json

FORMATS = ("chat", "instruction", "completion")
ROLES = ("system", "user", "assistant")

# What each format needs, worded for "expected ..." messages.
EXPECTED = {
    "chat": "messages (chat)",
    "instruction": "instruction + output (instruction)",
    "completion": "text, or prompt + completion (completion)",
}

Problems = list[tuple[str, str]]


def detect_format(row: dict) -> str | None:
    """Which format a row is written in, from the fields it fills; None when it looks like none of them."""
    if not isinstance(row, dict):
        return None
    # Columnar files (CSV, Parquet) carry every column in every row: an empty cell is not a field being used.
    present = {key for key, value in row.items() if value is not None and value != ""}
    if "messages" in present:
        return "chat"
    if {"instruction", "output"} <= present:
        return "instruction"
    if "text" in present or {"prompt", "completion"} <= present:
        return "completion"
    return None


def check_row(fmt: str, row: dict) -> tuple[dict | None, Problems]:
    return _CHECKS[fmt](row)


def describe(value) -> str:
    """A value as it should appear after 'got' in a message: short, with its JSON type."""
    if value is None:
        return "null"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        if not value.strip():
            return "a blank string" if value else "an empty string"
        return repr(text)
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def fields_of(row: dict) -> str:
    used = [key for key, value in row.items() if value is not None and value != ""]
    return ", ".join(used) if used else "none"


def _missing(row: dict, name: str, why: str = "") -> tuple[str, str]:
    return name, f"missing{why} (row has: {fields_of(row)})"


def _text(row: dict, name: str, problems: Problems, *, allow_empty: bool = False) -> str | None:
    value = row.get(name)
    if name not in row or (value is None and not allow_empty):
        problems.append(_missing(row, name))
        return None
    if value is None:
        return ""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        kind = "a string" if allow_empty else "a non-empty string"
        problems.append((name, f"expected {kind}, got {describe(value)}"))
        return None
    return value


def check_chat(row: dict) -> tuple[dict | None, Problems]:
    problems: Problems = []
    messages = row.get("messages")
    if messages is None:
        return None, [_missing(row, "messages", "; a chat row needs a list of {role, content} messages")]
    if isinstance(messages, str):
        # CSV and some Parquet exports can only hold the conversation as JSON text in a cell.
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            return None, [("messages", f"expected a list of messages (a JSON array in a text cell); "
                                       f"the cell is not valid JSON: {exc.msg}")]
    if not isinstance(messages, (list, tuple)) or not messages:
        return None, [("messages", f"expected a non-empty list of {{role, content}} objects, got {describe(messages)}")]

    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"expected an object with role and content, got {describe(message)}"))
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            got = "nothing" if "role" not in message else describe(role)
            problems.append((f"{where}.role", f"expected one of {', '.join(ROLES)}, got {got}"))
        if not isinstance(content, str) or not content.strip():
            got = "nothing" if "content" not in message else describe(content)
            problems.append((f"{where}.content", f"expected a non-empty string, got {got}"))
        out.append({"role": role, "content": content})
    if problems:
        return None, problems

    # Order rules are checked only once every message is well-formed: otherwise they would repeat the above.
    order = _check_order([m["role"] for m in out])
    if order:
        return None, [order]
    return {"messages": out}, []


def _check_order(roles: list[str]) -> tuple[str, str] | None:
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start):
        if role == "system":
            return f"messages[{i}].role", "a system message is only allowed as the first message"
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            return (f"messages[{i}].role",
                    f"expected '{expected}' here (after the optional system message, user and assistant "
                    f"messages must alternate, starting with user), got '{role}'")
    if roles[-1] != "assistant":
        last = len(roles) - 1
        why = ("there is no assistant message to learn from" if "assistant" not in roles
               else "a trailing message after the last answer would never be learned")
        return f"messages[{last}].role", f"the last message must be from the assistant ({why}), got '{roles[-1]}'"
    return None


def check_instruction(row: dict) -> tuple[dict | None, Problems]:
    problems: Problems = []
    instruction = _text(row, "instruction", problems)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        problems.append(("input", f"expected a string (or nothing), got {describe(extra)}"))
    output = _text(row, "output", problems)
    if problems:
        return None, problems
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}, []


def check_completion(row: dict) -> tuple[dict | None, Problems]:
    problems: Problems = []
    has_text = row.get("text") not in (None, "")
    has_pair = row.get("completion") not in (None, "")
    if has_text and has_pair:
        return None, [("text", "a completion row holds either text, or prompt + completion; this one has both")]
    if has_text or ("text" in row and "completion" not in row):
        text = _text(row, "text", problems)
        return (None, problems) if problems else ({"prompt": "", "completion": text}, [])
    if "completion" not in row:
        return None, [_missing(row, "text", ", and so are prompt + completion")]
    if "prompt" not in row:
        problems.append(_missing(row, "prompt", "; use `text` for rows without a prompt"))
    prompt = _text(row, "prompt", problems, allow_empty=True) if "prompt" in row else None
    completion = _text(row, "completion", problems)
    if problems:
        return None, problems
    return {"prompt": prompt, "completion": completion}, []


_CHECKS = {"chat": check_chat, "instruction": check_instruction, "completion": check_completion}
