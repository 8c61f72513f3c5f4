"""Packed, padding-free batches: the rows of a batch concatenated into sequences of at most `max_seq_len` tokens.

Each packed sequence carries `position_ids` that restart at 0 on every row. transformers reads those restarts
as row boundaries and confines attention to each row: on SDPA/eager it builds a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), on flash-attention it runs the variable-length kernel
(`modeling_flash_attention_utils._is_packed_sequence`). Both only look at `position_ids` when no attention mask
and no KV cache is passed, so packed batches carry no `attention_mask` and must run with `use_cache=False`
(training.py does; tests/test_packing.py fails if it stops doing so).

The batch is still the `batch_size` rows the sampler chose: packing changes how they are laid out, not which
rows a step learns from, so the loss of a step (mean over its supervised tokens) and the number of steps are
those of an unpacked run. What goes away is the padding to the longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import IGNORE


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign rows (by index) to as few bins of at most `capacity` tokens as first-fit-decreasing finds,
    then spread them evenly over that many bins, because a batch of bins is padded to its longest bin.

    Deterministic: ties are broken by row index. A row longer than `capacity` gets a bin of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        b = next((b for b, load in enumerate(loads) if load + lengths[i] <= capacity), len(loads))
        if b == len(loads):
            first_fit.append([])
            loads.append(0)
        first_fit[b].append(i)
        loads[b] += lengths[i]
    # Longest row first onto the lightest bin evens the bins out (less padding to the longest bin); it can
    # overfill a bin where first-fit-decreasing did not, and then first-fit-decreasing's bins are kept.
    even: list[list[int]] = [[] for _ in first_fit]
    even_loads = [0] * len(first_fit)
    for i in order:
        b = min(range(len(even)), key=lambda k: (even_loads[k], k))
        even[b].append(i)
        even_loads[b] += lengths[i]
    return even if max(even_loads, default=0) <= max(capacity, max(loads, default=0)) else first_fit


@dataclass
class PackingCollator:
    """Collate `{input_ids, labels}` rows into packed sequences with restarting `position_ids`.

    `flatten=True` puts every row of the batch into one sequence (shape `[1, tokens]`), which is what the
    flash-attention variable-length path needs; otherwise rows go into bins of at most `max_seq_len` tokens,
    padded to the longest bin, which keeps SDPA's dense block-diagonal mask at `max_seq_len`² per bin.
    Padding forms a segment of its own (positions restart there too) and its labels are ignored.
    """

    pad_token_id: int
    max_seq_len: int
    flatten: bool = False

    def __call__(self, features: list[dict]) -> dict:
        import torch

        rows = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        if self.flatten:
            bins = [list(range(len(rows)))]
        else:
            bins = pack_rows([len(ids) for ids, _ in rows], self.max_seq_len)
        width = max(sum(len(rows[i][0]) for i in members) for members in bins)
        input_ids, labels, positions = [], [], []
        for members in bins:
            ids_bin, labels_bin, pos_bin = [], [], []
            for i in members:
                ids, row_labels = rows[i]
                ids_bin += ids
                # The first token of a row is never a target: predicting it would mean predicting one row
                # from the end of another.
                labels_bin += [IGNORE] + row_labels[1:]
                pos_bin += range(len(ids))
            pad = width - len(ids_bin)
            input_ids.append(ids_bin + [self.pad_token_id] * pad)
            labels.append(labels_bin + [IGNORE] * pad)
            pos_bin += range(pad)
            positions.append(pos_bin)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


# --- attention within each row of a packed bin -------------------------------------------------------------------

PACKED_ATTENTION = "msov_packed_sdpa"


def row_spans(position_ids) -> list[list[tuple[int, int]]]:
    """(start, end) of each row in each bin: a row starts wherever a position does not follow the one before."""
    import torch

    starts = torch.diff(position_ids, dim=-1) != 1  # starts[:, t] is True when a row starts at t + 1
    spans = []
    width = position_ids.shape[1]
    for bin_starts in starts.tolist():
        begins = [0] + [t + 1 for t, s in enumerate(bin_starts) if s]
        spans.append(list(zip(begins, begins[1:] + [width])))
    return spans


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """SDPA run row by row inside each packed bin, causal and unmasked: the same result as SDPA with the
    block-diagonal mask transformers builds from restarting `position_ids`, without its cost.

    The dense mask makes every kernel (the CPU flash kernel included) compute all `width`² query-key pairs of a
    bin, although only the rows' own causal triangles count: with short rows in a 1024-token bin that is most of
    a small model's step. `packed_rows_mask` builds no mask at all for packed training batches, so attention
    memory grows with the rows, not with the bin squared (on CUDA each row goes to SDPA's flash or
    memory-efficient kernel). Whenever transformers did build a mask (padding, a cache, a sliding window shorter
    than the bin), it is used as is: plain SDPA, as with `sdpa`.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    if (attention_mask is not None or position_ids is None or q_len != key.shape[2]
            or q_len != position_ids.shape[-1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    spans = row_spans(position_ids.expand(query.shape[0], -1))
    if all(len(bin_spans) == 1 for bin_spans in spans):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    kwargs.pop("is_causal", None)
    out = []
    for b, bin_spans in enumerate(spans):
        rows = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                       None, is_causal=True, **kwargs)[0] for s, e in bin_spans]
        out.append(torch.cat(rows, dim=1) if len(rows) > 1 else rows[0])
    return torch.cat(out, dim=0), None


def packed_rows_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     attention_mask=None, local_size: int | None = None, **kwargs):
    """No mask where `packed_sdpa_attention` needs none: a whole sequence with neither padding mask nor cache
    offset (a training batch, packed or not), within any sliding window. Anything else gets SDPA's own mask."""
    from transformers.masking_utils import sdpa_mask

    if (attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0
            and (local_size is None or q_length <= local_size)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, **kwargs)


def register_packed_attention() -> str:
    """Make `PACKED_ATTENTION` a name transformers accepts as `attn_implementation`; returns the name.
    Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_rows_mask)
    return PACKED_ATTENTION
