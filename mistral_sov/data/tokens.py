"""Turn normalised records into token ids and labels, with the loss on the answers only.

Which tokens are learned is decided on characters, not tokens: the chat template renders the conversation once,
each assistant turn is located in that string by rendering the conversation up to it, and a token is supervised
when its first character falls inside an assistant turn. This works for any template and tokenizer that can
report character offsets (every "fast" tokenizer), with no guessing about how a template spells its markers.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    import datasets

IGNORE = -100  # the label transformers' loss skips
OVERLONG = ("truncate", "drop")
TRAIN_ON = ("completion", "all")
_BATCH = 1000


@dataclass
class TokenStats:
    rows_in: int
    rows_out: int
    truncated: int
    dropped_overlong: int
    dropped_unsupervised: int
    tokens: int
    supervised_tokens: int
    min_len: int
    median_len: float
    max_len: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenizedData:
    dataset: "datasets.Dataset"  # input_ids, labels; unpadded (the collator pads)
    stats: TokenStats


def render_prompt(messages: list[dict], tokenizer) -> str:
    """The conversation so far, rendered so that the model's next tokens are the assistant's reply."""
    _require_chat_template(tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_records(records: list[dict], tokenizer, *, max_seq_len: int, overlong: str = "truncate",
                     train_on: str = "completion") -> TokenizedData:
    if overlong not in OVERLONG or train_on not in TRAIN_ON or max_seq_len < 2:
        raise ValueError(f"tokenize_records: overlong={overlong!r}, train_on={train_on!r}, "
                         f"max_seq_len={max_seq_len!r}; expected one of {OVERLONG}, one of {TRAIN_ON}, and >= 2")
    if not records:
        raise DataError("there are no records to tokenise", hint="Point the recipe at a file with training examples.")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the model's tokenizer is a slow (Python) tokenizer; msov needs a fast one to locate "
                        "the answers inside each example",
                        hint="Use a model folder that ships tokenizer.json.")
    if any("messages" in record for record in records):
        _require_chat_template(tokenizer)

    texts, spans = [], []
    for number, record in enumerate(records, 1):
        text, supervised = (_chat(record["messages"], tokenizer, train_on, number) if "messages" in record
                            else _completion(record, tokenizer, train_on))
        texts.append(text)
        spans.append(supervised)

    rows, lengths, longest = [], [], 0
    truncated = dropped_overlong = dropped_unsupervised = supervised_tokens = 0
    for start in range(0, len(texts), _BATCH):
        encoded = tokenizer(texts[start:start + _BATCH], add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, supervised in zip(encoded["input_ids"], encoded["offset_mapping"],
                                            spans[start:start + _BATCH]):
            longest = max(longest, len(ids))
            labels = _labels(ids, offsets, supervised)
            if len(ids) > max_seq_len:
                if overlong == "drop":
                    dropped_overlong += 1
                    continue
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                truncated += 1
            learned = sum(label != IGNORE for label in labels)
            if learned == 0:
                # A row with nothing to learn divides the loss by zero: NaN for its whole batch.
                dropped_unsupervised += 1
                continue
            supervised_tokens += learned
            lengths.append(len(ids))
            rows.append({"input_ids": list(ids), "labels": labels})

    if not rows:
        raise DataError(
            f"no training rows are left after tokenising {len(records)} records with max_seq_len={max_seq_len}: "
            f"{dropped_overlong} dropped as longer than max_seq_len, {dropped_unsupervised} dropped because no "
            f"answer token survived ({truncated} truncated)",
            hint=f"Raise train.max_seq_len (the longest example has {longest} tokens)"
                 + (", or set data.overlong: truncate." if overlong == "drop" else "."))

    import datasets

    stats = TokenStats(rows_in=len(records), rows_out=len(rows), truncated=truncated,
                       dropped_overlong=dropped_overlong, dropped_unsupervised=dropped_unsupervised,
                       tokens=sum(lengths), supervised_tokens=supervised_tokens, min_len=min(lengths),
                       median_len=float(statistics.median(lengths)), max_len=max(lengths))
    return TokenizedData(dataset=datasets.Dataset.from_list(rows), stats=stats)


def _labels(ids: list[int], offsets: list, spans: list[tuple[int, int]] | None) -> list[int]:
    if spans is None:
        labels = list(ids)
    else:
        labels, k = [], 0
        for token, (begin, _end) in zip(ids, offsets):
            while k < len(spans) and begin >= spans[k][1]:
                k += 1
            labels.append(token if k < len(spans) and begin >= spans[k][0] else IGNORE)
    # Position 0 is never a prediction target (the model shifts labels by one): marking it keeps the counts of
    # supervised tokens equal to the number of loss terms.
    if labels:
        labels[0] = IGNORE
    return labels


def _chat(messages: list[dict], tokenizer, train_on: str, number: int) -> tuple[str, list | None]:
    full = _render(tokenizer, messages, number=number)
    if train_on == "all":
        return full, None
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, number=number)
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], number=number)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"conversation {number} ({_opening(messages)}): the chat template is not prefix-stable: rendering "
                f"the conversation up to answer {i} does not give the start of the whole rendered conversation, "
                "so the answers cannot be located to train on them alone",
                hint="Set `data.train_on: all` to learn from every token, or give a prefix-stable template with "
                     "`data.chat_template: path/to/template.jinja`.")
        spans.append((len(before), len(through)))
    return full, spans


def _completion(record: dict, tokenizer, train_on: str) -> tuple[str, list | None]:
    head = (tokenizer.bos_token or "") + record["prompt"]
    text = head + record["completion"] + (tokenizer.eos_token or "")
    return text, None if train_on == "all" else [(len(head), len(text))]


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, number: int | None = None) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        which = f"conversation {number} ({_opening(messages)})" if number else "the conversation"
        raise DataError(f"{which}: the chat template failed to render it: {exc}",
                        hint="Check the conversation against what the model's template accepts, or give another "
                             "template with `data.chat_template: path/to/template.jinja`.") from exc


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template, so chat and instruction data cannot be "
                        "turned into the model's prompt format",
                        hint="Give the template the model was trained with in the recipe: "
                             "`data.chat_template: path/to/template.jinja`.")


def _opening(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    first = users[0] if users else ""
    return f"starting {first[:40]!r}" if first else "empty"
