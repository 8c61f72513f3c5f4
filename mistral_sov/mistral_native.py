"""Mistral's own tokenizer (mistral-common) as the tokenizer of record for Mistral models.

mistral-common is imported only here and only when a Mistral tokenizer file is in play: it is heavy-ish and
`msov --help` must stay fast.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, EnvironmentRefused

IGNORE = -100


def mistral_tokenizer_file(folder: Path) -> Path | None:
    """The Mistral tokenizer file a release ships (tekken.json, tokenizer.model.v3, ...), newest version first."""
    tekken = folder / "tekken.json"
    if tekken.is_file():
        return tekken
    versioned = sorted(p for p in folder.glob("tokenizer.model.v*") if p.is_file())
    return versioned[-1] if versioned else None


def load_mistral_tokenizer(path: Path):
    try:
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError:
        raise EnvironmentRefused(f"{path}: a Mistral tokenizer file, but mistral-common is not installed.",
                                 hint="pip install mistral-common (see constraints.txt for the tested version)."
                                 ) from None
    # Finetuning mode: a conversation may end with the assistant's answer, which is what training encodes.
    return MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)


def encode_chat(tokenizer, record: dict, number: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation, as mistral-common encodes it for training.

    The ids are exactly those of `encode_chat_completion`; each message is encoded by the instruct tokenizer's
    own per-message encoder (as mistral-finetune builds its masks), and only assistant messages, with their tool
    calls and EOS, are supervised. The per-message concatenation is checked against the whole encoding, so a
    mistral-common that assembles requests differently fails loudly instead of training on shifted labels.
    """
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = record["messages"]
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    keep = ("role", "content", "tool_calls", "tool_call_id")
    openai = [{k: v for k, v in m.items() if k in keep} for m in messages]
    try:
        request = ChatCompletionRequest.from_openai(openai, tools=record.get("tools") or None)
        reference = tokenizer.encode_chat_completion(request).tokens
        validated = tokenizer._chat_completion_request_validator.validate_request(request)
        instruct_request = tokenizer._instruct_request_normalizer.from_chat_completion_request(validated)
    except (MistralCommonException, ValueError, AssertionError, NotImplementedError) as exc:
        raise DataError(f"conversation {number} ({_opening(messages)}): Mistral's tokenizer "
                        f"({tokenizer.instruct_tokenizer.tokenizer.version.value}) cannot encode it: {exc}",
                        hint="Check that roles alternate user/assistant and that this tokenizer version supports "
                             "what the conversation uses (tools need v3 or later).") from exc

    instruct = tokenizer.instruct_tokenizer
    normalised = instruct_request.messages
    first_user, last_user = instruct.find_first_last_user(instruct_request)
    answers = [m for m in normalised if isinstance(m, AssistantMessage)]
    if len(answers) != len(weights) and any(w == 0 for w in weights):
        raise DataError(f"conversation {number} ({_opening(messages)}): Mistral's tokenizer merges consecutive "
                        "assistant messages, so a per-message weight cannot be honoured",
                        hint="Merge the consecutive assistant messages and give them one weight.")
    ids, labels, answer = list(instruct.start()), [IGNORE] * len(instruct.start()), 0
    for index, message in enumerate(normalised):
        if isinstance(message, UserMessage):
            tokens = instruct.encode_user_message(message, instruct_request.available_tools, index == last_user,
                                                  index == first_user, system_prompt=instruct_request.system_prompt,
                                                  force_img_first=True, settings=instruct_request.settings)[0]
        elif isinstance(message, ToolMessage):
            tokens = instruct.encode_tool_message(message, index < last_user)[0]
        elif isinstance(message, SystemMessage):
            tokens = instruct.encode_system_message(message)[0]
        else:
            tokens = instruct.encode_assistant_message(message, index < last_user)
        learned = isinstance(message, AssistantMessage) and (weights[answer] if answer < len(weights) else 1) != 0
        answer += isinstance(message, AssistantMessage)
        ids += tokens or []
        labels += list(tokens or []) if learned else [IGNORE] * len(tokens or [])
    if ids != reference:
        raise RuntimeError(f"conversation {number}: mistral-common's per-message encoding differs from its whole "
                           "encoding; this mistral-common version is not the one msov was tested with")
    labels[0] = IGNORE  # position 0 is never a prediction target
    return ids, labels


def _opening(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return f"starting {users[0][:40]!r}" if users and users[0] else "empty"
