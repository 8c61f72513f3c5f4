"""Turn normalised records into token ids and labels, with the loss on the answers only.

Which tokens are learned is decided on characters, not tokens: the chat template renders the conversation once,
each assistant turn is located in that string by rendering the conversation up to it, and a token is supervised
when its first character falls inside an assistant turn. This works for any template and tokenizer that can
report character offsets (every "fast" tokenizer), with no guessing about how a template spells its markers.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import tempfile
import weakref
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DataError
from ..record import TokenStats
from ..guard.paths import pid_alive

if TYPE_CHECKING:
    import datasets

IGNORE = -100  # the label transformers' loss skips
OVERLONG = ("truncate", "drop")
TRAIN_ON = ("completion", "all")
_BATCH = 1000  # rows per Arrow record batch written while tokenising
_TOKENS_PREFIX = "msov-tokens-"  # + the writer's pid: a dead writer's folder can be told apart and removed
_NONE = object()


@dataclass
class TokenizedData:
    dataset: "datasets.Dataset"  # input_ids, labels; unpadded (the collator pads)
    stats: TokenStats


def render_prompt(messages: list[dict], tokenizer) -> str:
    """The conversation so far, rendered so that the model's next tokens are the assistant's reply."""
    _require_chat_template(tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_records(records: Iterable[dict], tokenizer, *, max_seq_len: int, overlong: str = "truncate",
                     train_on: str = "completion", preference: bool = False) -> TokenizedData:
    """`preference`: the records are preference pairs (see `preference_conversations`), each encoded as two rows
    with the loss on the answer only (`train_on` does not apply: a pair is compared on its answers), into the
    columns chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels.

    Encode records (a list, or a generator reading a file) one at a time into an Arrow file in a temporary
    folder (the system's temp folder, never the user's cache or a run folder); the dataset is memory-mapped from
    it and the folder is removed once the dataset is garbage-collected, or when the process exits. Only the rows'
    lengths stay in memory, for the statistics: memory does not grow with the data."""
    if overlong not in OVERLONG or train_on not in TRAIN_ON or max_seq_len < 2:
        raise ValueError(f"tokenize_records: overlong={overlong!r}, train_on={train_on!r}, "
                         f"max_seq_len={max_seq_len!r}; expected one of {OVERLONG}, one of {TRAIN_ON}, and >= 2")
    mistral = getattr(tokenizer, "msov_mistral", None)  # mistral-common's tokenizer, set by load_tokenizer
    records = iter(records)
    first = next(records, _NONE)
    if first is _NONE:
        raise DataError("there are no records to tokenise", hint="Point the recipe at a file with training examples.")
    if mistral is None and not getattr(tokenizer, "is_fast", False):
        raise DataError("the model's tokenizer is a slow (Python) tokenizer; msov needs a fast one to locate "
                        "the answers inside each example",
                        hint="Use a model folder that ships tokenizer.json.")

    import datasets
    from datasets.arrow_writer import ArrowWriter

    _remove_dead_token_folders()
    folder = tempfile.mkdtemp(prefix=f"{_TOKENS_PREFIX}{os.getpid()}-")
    try:
        path = os.path.join(folder, "tokens.arrow")
        features = _pair_features(datasets) if preference else _features(datasets)
        encode = _encode_pairs_into if preference else _encode_into
        with ArrowWriter(features=features, path=path, writer_batch_size=_BATCH) as writer:
            stats = encode(writer, itertools.chain([first], records), tokenizer, mistral,
                           max_seq_len=max_seq_len, overlong=overlong, train_on=train_on)
        dataset = datasets.Dataset.from_file(path)  # memory-mapped, not read into memory
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # Datasets made from this one (select, map) share its file; they live while it does, as in a run.
    weakref.finalize(dataset, shutil.rmtree, folder, ignore_errors=True)
    return TokenizedData(dataset=dataset, stats=stats)


def _remove_dead_token_folders() -> None:
    """A process killed while it held tokens (kill -9, power loss) leaves its folder; its pid says it is gone."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{_TOKENS_PREFIX}*-*")):
        pid = os.path.basename(folder)[len(_TOKENS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _features(datasets):
    # As Dataset.from_list infers them: token ids as int32 (datasets' choice for input_ids), labels as int64.
    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "labels": datasets.Sequence(datasets.Value("int64"))})


def _pair_features(datasets):
    ids, labels = datasets.Sequence(datasets.Value("int32")), datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({"chosen_input_ids": ids, "chosen_labels": labels,
                              "rejected_input_ids": ids, "rejected_labels": labels})


def preference_conversations(record: dict) -> tuple[dict, dict]:
    """A preference record as two chat records that share their prompt: (prompt + chosen, prompt + rejected).
    A text prompt is the user's message, so pairs go through the chat template exactly as SFT conversations do."""
    if "messages" in record:
        before = list(record["messages"])
        return {"messages": before + record["chosen"]}, {"messages": before + record["rejected"]}
    user = [{"role": "user", "content": record["prompt"]}]
    return ({"messages": user + [{"role": "assistant", "content": record["chosen"]}]},
            {"messages": user + [{"role": "assistant", "content": record["rejected"]}]})


def _encode_pairs_into(writer, records: Iterator[dict], tokenizer, mistral, *, max_seq_len: int, overlong: str,
                       train_on: str) -> TokenStats:
    """As `_encode_into`, a pair at a time: a pair is kept or dropped whole (a pair without both answers compares
    nothing); its statistics count both sequences."""
    lengths = array("q")
    batch: dict[str, list] = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [],
                              "rejected_labels": []}
    rows_in = longest = truncated = dropped_overlong = dropped_unsupervised = supervised_tokens = pairs = 0
    if mistral is None:
        _require_chat_template(tokenizer)
    for number, record in enumerate(records, 1):
        rows_in = number
        encoded = [_mistral_chat(mistral, chat, number) if mistral is not None
                   else _chat(chat, tokenizer, "completion", number) for chat in preference_conversations(record)]
        longest = max(longest, *(len(ids) for ids, _ in encoded))
        if any(len(ids) > max_seq_len for ids, _ in encoded):
            if overlong == "drop":
                dropped_overlong += 1
                continue
            # The start is kept, as TRL's keep_start does: the prompt and the first answer tokens stay together.
            encoded = [(ids[:max_seq_len], labels[:max_seq_len]) for ids, labels in encoded]
            truncated += 1
        learned = [sum(label != IGNORE for label in labels) for _, labels in encoded]
        if not all(learned):
            dropped_unsupervised += 1
            continue
        pairs += 1
        supervised_tokens += sum(learned)
        for side, (ids, labels) in zip(("chosen", "rejected"), encoded):
            lengths.append(len(ids))
            batch[f"{side}_input_ids"].append(list(ids))
            batch[f"{side}_labels"].append(list(labels))
        if len(batch["chosen_labels"]) == _BATCH:
            writer.write_batch(batch)
            batch = {key: [] for key in batch}
    if not pairs:
        raise DataError(
            f"no preference pairs are left after tokenising {rows_in} records with max_seq_len={max_seq_len}: "
            f"{dropped_overlong} dropped as longer than max_seq_len, {dropped_unsupervised} dropped because an "
            f"answer lost every token ({truncated} truncated)",
            hint=f"Raise train.max_seq_len (the longest sequence has {longest} tokens)"
                 + (", or set data.overlong: truncate." if overlong == "drop" else "."))
    return _close(writer, batch, lengths, rows_in=rows_in, rows_out=pairs, truncated=truncated,
                  dropped_overlong=dropped_overlong, dropped_unsupervised=dropped_unsupervised,
                  supervised_tokens=supervised_tokens)


def _encode_into(writer, records: Iterator[dict], tokenizer, mistral, *, max_seq_len: int, overlong: str,
                 train_on: str) -> TokenStats:
    """Encode and write each record in turn (batches of _BATCH rows); count, and keep each kept row's length."""
    lengths = array("q")
    batch: dict[str, list] = {"input_ids": [], "labels": []}
    rows_in = longest = truncated = dropped_overlong = dropped_unsupervised = supervised_tokens = 0
    template_checked = mistral is not None
    for number, record in enumerate(records, 1):
        rows_in = number
        chat = "messages" in record
        if chat and not template_checked:
            _require_chat_template(tokenizer)
            template_checked = True
        ids, labels = (_mistral_chat(mistral, record, number, train_on) if mistral is not None and chat
                       else _chat(record, tokenizer, train_on, number) if chat
                       else _mistral_completion(mistral, record, train_on) if mistral is not None
                       else _completion(record, tokenizer, train_on))
        longest = max(longest, len(ids))
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
        batch["input_ids"].append(list(ids))
        batch["labels"].append(list(labels))
        if len(batch["labels"]) == _BATCH:
            writer.write_batch(batch)
            batch = {"input_ids": [], "labels": []}

    if not lengths:
        raise DataError(
            f"no training rows are left after tokenising {rows_in} records with max_seq_len={max_seq_len}: "
            f"{dropped_overlong} dropped as longer than max_seq_len, {dropped_unsupervised} dropped because no "
            f"answer token survived ({truncated} truncated)",
            hint=f"Raise train.max_seq_len (the longest example has {longest} tokens)"
                 + (", or set data.overlong: truncate." if overlong == "drop" else "."))
    return _close(writer, batch, lengths, rows_in=rows_in, rows_out=len(lengths), truncated=truncated,
                  dropped_overlong=dropped_overlong, dropped_unsupervised=dropped_unsupervised,
                  supervised_tokens=supervised_tokens)


def _close(writer, batch: dict[str, list], lengths: array, **counts) -> TokenStats:
    """Write the last, partial batch, finish the Arrow file, and sum up what was written."""
    import numpy as np

    if any(batch.values()):
        writer.write_batch(batch)
    writer.finalize()
    # numpy's median of ints is statistics.median's: the middle value, or the mean of the two middle ones.
    return TokenStats(**counts, tokens=sum(lengths), min_len=min(lengths), max_len=max(lengths),
                      median_len=float(np.median(np.frombuffer(lengths, dtype=np.int64))))


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


def _mistral_chat(mistral, record: dict, number: int, train_on: str = "completion") -> tuple[list, list]:
    from ..model.mistral_native import encode_chat

    ids, labels = encode_chat(mistral, record, number)
    return ids, ([IGNORE] + ids[1:] if train_on == "all" else labels)


def _mistral_completion(mistral, record: dict, train_on: str) -> tuple[list, list]:
    """A completion row by the tokenizer of record: a tekken.json-only folder's Hugging Face tokenizer knows no
    BOS or EOS."""
    raw = mistral.instruct_tokenizer.tokenizer
    ids = raw.encode(record["prompt"] + record["completion"], bos=True, eos=True)
    head = len(raw.encode(record["prompt"], bos=True, eos=False)) if train_on != "all" else 1
    return ids, [IGNORE] * head + ids[head:]


def _chat(record: dict, tokenizer, train_on: str, number: int) -> tuple[list, list]:
    messages = record["messages"]
    tools = record.get("tools") or None
    full = _render(tokenizer, messages, tools=tools, number=number)
    for i, message in enumerate(messages):
        content = message.get("content")
        if message["role"] in ("system", "user", "assistant") and isinstance(content, str) and content.strip():
            # Anywhere, not in order: templates may move a message (Mistral's put the system prompt last).
            if content.strip() not in full:
                raise DataError(
                    f"conversation {number} ({_opening(messages)}): message {i} ({message['role']}) is not in the "
                    "text the chat template renders: the template drops it, so the model would never see it",
                    hint="Give a template that renders every message with `data.chat_template: path/to/template."
                         "jinja`, or remove the messages this template does not support.")
    spans = None if train_on == "all" else _answer_spans(messages, tools, full, tokenizer, number)
    ids, offsets = _encode_plain_data(tokenizer, full, messages)
    return ids, _labels(ids, offsets, spans)


def _answer_spans(messages: list[dict], tools, full: str, tokenizer, number: int) -> list[tuple[int, int]]:
    """Each learned assistant turn as a character span of the whole rendering.

    A turn is what rendering up to and including it adds to rendering up to its generation prompt. That is
    found in the whole conversation even when the template is not prefix-stable (Mistral's put the system prompt
    and tools in the last user turn, so the whole conversation does not start with its first turns)."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools=tools, add_generation_prompt=True, number=number)
        through = _render(tokenizer, messages[:i + 1], tools=tools, number=number)
        turn = through[len(before):] if through.startswith(before) else ""
        begin = full.find(turn, cursor) if turn else -1
        if begin < 0:
            raise DataError(
                f"conversation {number} ({_opening(messages)}): answer {i} cannot be located in the rendered "
                "conversation: the chat template renders a turn differently depending on what follows it",
                hint="Set `data.train_on: all` to learn from every token, or give a template that renders each "
                     "turn the same way with `data.chat_template: path/to/template.jinja`.")
        cursor = begin + len(turn)
        if message.get("weight", 1) != 0:
            spans.append((begin, cursor))
    return spans


def _encode_plain_data(tokenizer, text: str, messages: list[dict]) -> tuple[list[int], list]:
    """Tokenise a rendering so that the template's special tokens are special and the messages' text is not:
    `What is [INST] ?` from a user stays text, and an answer's `</s>` is not a real end of sequence."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    contents = [m["content"] for m in messages if isinstance(m.get("content"), str) and m["content"]]
    leaked = [(b, e) for token, (b, e) in zip(ids, offsets)
              if token in special and any(text[b:e] in content for content in contents)]
    if not leaked or not _inside_contents(text, leaked, contents):
        return ids, offsets
    # Added tokens split the text before anything else, so the pieces between the template's own special
    # tokens are tokenised independently anyway: re-encoding those pieces with special-token parsing off gives
    # what the data text alone would have been.
    template = [(b, e, t) for t, (b, e) in zip(ids, offsets)
                if t in special and not _inside_contents(text, [(b, e)], contents)]
    out_ids, out_offsets, start = [], [], 0
    for begin, end, token in template + [(len(text), len(text), None)]:
        if begin > start:
            piece = tokenizer(text[start:begin], add_special_tokens=False, return_offsets_mapping=True,
                              split_special_tokens=True)
            out_ids += piece["input_ids"]
            out_offsets += [(b + start, e + start) for b, e in piece["offset_mapping"]]
        if token is not None:
            out_ids.append(token)
            out_offsets.append((begin, end))
        start = end
    return out_ids, out_offsets


def _inside_contents(text: str, spans: list[tuple[int, int]], contents: list[str]) -> bool:
    """Whether any of the spans lies inside where one of the messages' texts occurs in the rendering."""
    places = []
    for content in contents:
        at = text.find(content)
        while at >= 0:
            places.append((at, at + len(content)))
            at = text.find(content, at + 1)
    return any(b >= pb and e <= pe for b, e in spans for pb, pe in places)


def _completion(record: dict, tokenizer, train_on: str) -> tuple[list, list]:
    """ids exactly as `tokenizer(text)` gives them (its own BOS and prefix-space rules), then EOS; data text is
    never parsed as special tokens."""
    prompt, text = record["prompt"], record["prompt"] + record["completion"]
    encoded = tokenizer(text, return_offsets_mapping=True, split_special_tokens=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        # A tokenizer whose own rules add no BOS still gets one: a row must start where generation starts.
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text)))
    # A token that starts in the prompt but ends in the completion (a merge across the boundary) is learned.
    spans = None if train_on == "all" else [(len(prompt), len(text) + 1)]
    return ids, _labels(ids, [(b if e <= len(prompt) or b >= len(prompt) else len(prompt), e)
                              for b, e in offsets], spans)


def _render(tokenizer, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = False,
            number: int | None = None) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
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
