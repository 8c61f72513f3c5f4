"""The three row formats msov accepts, and the one record form every later stage sees.

Each `check_*` function both validates a raw row and normalises it, so the rules for what a field may hold
live in exactly one place. They return `(record, problems)`: the record only when problems is empty.
Problems are `(field, what is wrong)` pairs; the loader adds the file and line.
"""

from __future__ import annotations

import json

FORMATS = ("chat", "sharegpt", "instruction", "completion", "preference")
# Formats that supervised fine-tuning trains on; preference pairs are read and checked, for DPO-style tools.
SFT_FORMATS = FORMATS[:4]
ROLES = ("system", "user", "assistant", "tool")

# ShareGPT speaker names as axolotl and LLaMA-Factory read them; function_call is the assistant calling a tool.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
                  "function_call": "function_call"}

# What each format needs, worded for "expected ..." messages.
EXPECTED = {
    "chat": "messages (chat)",
    "sharegpt": "conversations of {from, value} (sharegpt)",
    "instruction": "instruction + output (instruction)",
    "completion": "text, or prompt + completion (completion)",
    "preference": "prompt + chosen + rejected (preference)",
}

Problems = list[tuple[str, str]]


def detect_format(row: dict) -> str | None:
    """Which format a row is written in, from the fields it fills; None when it looks like none of them."""
    if not isinstance(row, dict):
        return None
    # Columnar files (CSV, Parquet) carry every column in every row: an empty cell is not a field being used.
    present = {key for key, value in row.items() if value is not None and value != ""}
    if {"chosen", "rejected"} <= present:
        return "preference"
    if "messages" in present:
        return "chat"
    if "conversations" in present:
        return "sharegpt"
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

    out = [_check_message(f"messages[{i}]", message, problems) for i, message in enumerate(messages)]
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        problems.append(("tools", f"expected a list of function tool schemas, got {describe(tools)}"))
    if problems:
        return None, problems

    # Order rules are checked only once every message is well-formed: otherwise they would repeat the above.
    order = _check_order(out)
    if order:
        return None, [order]
    return ({"messages": out, "tools": tools} if tools else {"messages": out}), []


def _check_message(where: str, message, problems: Problems) -> dict | None:
    if not isinstance(message, dict):
        problems.append((where, f"expected an object with role and content, got {describe(message)}"))
        return None
    role, content = message.get("role"), _content(where, message.get("content"), problems)
    if role not in ROLES:
        got = "nothing" if "role" not in message else describe(role)
        problems.append((f"{where}.role", f"expected one of {', '.join(ROLES)}, got {got}"))
    out = {"role": role, "content": content}
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        out["tool_calls"] = _tool_calls(where, calls, problems)
    elif content is not False and (not isinstance(content, str) or not content.strip()):
        got = "nothing" if "content" not in message else describe(message.get("content"))
        problems.append((f"{where}.content", f"expected a non-empty string, got {got}"))
    if role == "tool" and message.get("tool_call_id") is not None:
        out["tool_call_id"] = str(message["tool_call_id"])
    if role == "assistant" and "weight" in message:
        if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
            problems.append((f"{where}.weight", f"expected 0 or 1, got {describe(message['weight'])}"))
        out["weight"] = message["weight"]
    return out


def _content(where: str, content, problems: Problems):
    """OpenAI content: a string, or a list of parts of which only text can be trained on. False: already reported."""
    if not isinstance(content, list):
        return content
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            problems.append((f"{where}.content[{k}]", "expected a text part {type: text, text}, got "
                             + (f"a '{kind}' part: msov trains text models only" if kind else describe(part))))
            return False
    return "".join(texts)


def _tool_calls(where: str, calls, problems: Problems) -> list | None:
    if not isinstance(calls, list) or not calls:
        problems.append((f"{where}.tool_calls", f"expected a non-empty list of tool calls, got {describe(calls)}"))
        return None
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append((f"{where}.tool_calls[{k}].function.name", "expected the name of the function called"))
        elif not isinstance(function.get("arguments"), str):
            problems.append((f"{where}.tool_calls[{k}].function.arguments",
                             f"expected JSON text, got {describe(function.get('arguments'))}"))
    return calls


def check_sharegpt(row: dict) -> tuple[dict | None, Problems]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, [("conversations", f"expected a non-empty list of {{from, value}} turns, got {describe(turns)}")]
    messages, problems = [], []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = SHAREGPT_ROLES.get(speaker.lower() if isinstance(speaker, str) else None)
        if role is None:
            problems.append((f"conversations[{i}].from", f"expected one of {', '.join(SHAREGPT_ROLES)}, got "
                             + ("nothing" if not isinstance(turn, dict) or "from" not in turn else describe(speaker))))
            continue
        value = turn.get("value")
        if role == "function_call":
            messages.append(_sharegpt_call(i, value, len(messages), problems))
        else:
            messages.append({"role": role, "content": value})
    if problems:
        return None, problems
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)  # LLaMA-Factory keeps the tool schemas as JSON text
        except json.JSONDecodeError as exc:
            return None, [("tools", f"expected a list of tool schemas (JSON text); not valid JSON: {exc.msg}")]
    record, found = check_chat({"messages": messages, **({"tools": tools} if tools else {})})
    # Report in the file's own terms: conversations[i], not the messages[i] it was turned into.
    return record, [(name.replace("messages", "conversations", 1), what) for name, what in found]


def _sharegpt_call(i: int, value, n: int, problems: Problems) -> dict:
    try:
        call = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        problems.append((f"conversations[{i}].value", 'expected a function call as JSON text {"name", "arguments"}'))
        return {}
    arguments = call.get("arguments", {})
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{n}", "type": "function",
        "function": {"name": call["name"],
                     "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}]}


def _check_order(messages: list[dict]) -> tuple[str, str] | None:
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    expected = "user"
    for i, role in enumerate(roles[start:], start):
        if role == "system":
            return f"messages[{i}].role", "a system message is only allowed as the first message"
        # A tool result answers the assistant's call; more results may follow, then the assistant speaks again.
        if role == "tool" and (expected == "tool" or roles[i - 1] == "tool"):
            expected = "assistant"
            continue
        if role != expected:
            return (f"messages[{i}].role",
                    f"expected '{expected}' here (after the optional system message, user and assistant "
                    f"messages must alternate, starting with user; tool results follow an assistant's tool "
                    f"calls), got '{role}'")
        if role == "assistant":
            expected = "tool" if messages[i].get("tool_calls") else "user"
        else:
            expected = "assistant"
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


def check_preference(row: dict) -> tuple[dict | None, Problems]:
    """prompt + chosen + rejected as text, or a conversation (messages or prompt as a list) and the chosen and
    rejected assistant messages as lists, as TRL's preference datasets write them."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        problems: Problems = []
        prompt = _text(row, "prompt", problems)
        _text(row, "chosen", problems)
        _text(row, "rejected", problems)
        return (None, problems) if problems else ({"prompt": prompt, "chosen": chosen, "rejected": rejected}, [])
    before = row.get("messages", row.get("prompt", []))
    if not isinstance(before, list):
        return None, [("prompt", f"expected a list of messages when chosen and rejected are lists, "
                                 f"got {describe(before)}")]
    record = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(answer, list) or not answer:
            return None, [(name, f"expected a string or a non-empty list of assistant messages, got {describe(answer)}")]
        checked, found = check_chat({"messages": before + answer})
        if found:
            return None, [(where.replace("messages", name, 1) if where.startswith(f"messages[{len(before)}")
                           else where, what) for where, what in found]
        record[name] = checked["messages"][len(before):]
    return {"messages": before, **record}, []


_CHECKS = {"preference": check_preference, "chat": check_chat, "sharegpt": check_sharegpt, "instruction": check_instruction, "completion": check_completion}
