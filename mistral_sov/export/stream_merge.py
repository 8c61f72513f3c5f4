"""The streamed merge: a LoRA adapter folded into base weights, written tensor by tensor into safetensors shards.

The merge never holds the model: each base tensor is opened on its own (safetensors maps the file; closing the
handle after one tensor releases its pages), the LoRA delta `scale * B @ A` is folded in (in float32), and the
result is written straight into its output shard, hashed as it goes. Output shard headers are planned from the
base headers before any data is read, which is what lets a shard be written without first holding it in memory.
Peak memory is the adapter plus a few copies of the largest tensor, whatever the model or shard size.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError, ModelFolderError
from ..events import EventSink, no_events
from ..record import read_json

_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16")
_PREFIX = "base_model.model."  # PEFT's prefix for a causal LM's parameters in adapter_model.safetensors
# What each LoRA tensor of an adapter file is, by the end of its key: (slot, layer kind).
_LORA_SUFFIXES = ((".lora_A.weight", "A", "linear"), (".lora_B.weight", "B", "linear"),
                  (".lora_B.bias", "bias", "linear"), (".lora_embedding_A", "A", "embedding"),
                  (".lora_embedding_B", "B", "embedding"), (".lora_magnitude_vector", "M", None))
# adapter_config.json fields that change what merging means; the streamed merge refuses rather than guesses.
_UNSUPPORTED = ("fan_in_fan_out", "use_qalora", "trainable_token_indices", "layer_replication", "target_parameters",
                "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config",
                "velora_config", "megatron_config")


def check_adapter_config(config: dict, where: Path) -> dict:
    """The adapter_config.json (read from `where`) if the streamed merge knows what merging it means."""
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{where}: peft_type {config.get('peft_type')!r}; msov merges LoRA adapters only.")
    for name in _UNSUPPORTED:
        if config.get(name):
            raise InputError(f"{where}: {name} is set ({config[name]!r}); the streamed merge supports LoRA, rsLoRA "
                             f"and DoRA on linear layers (and LoRA on embeddings) only.",
                             hint="Export the adapter instead (--adapter), or merge with peft's merge_and_unload.")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's, else model.safetensors, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in read_json(index).get("weight_map", {}).values()})
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]  # not e.g. consolidated.safetensors beside it (other tensor names)
    return sorted(folder.glob("*.safetensors"))


def base_tensors(folder: Path) -> dict[str, tuple[Path, str, list[int]]]:
    """{name: (file, safetensors dtype, shape)} from the headers alone, in file order then name order."""
    from safetensors import safe_open

    tensors: dict[str, tuple[Path, str, list[int]]] = {}
    for path in weight_files(folder):
        with safe_open(path, "pt") as handle:
            for name in sorted(handle.keys()):
                if name in tensors:
                    raise ModelFolderError(f"{folder}: tensor {name} is in both {tensors[name][0].name} and "
                                           f"{path.name}.")
                piece = handle.get_slice(name)
                tensors[name] = (path, piece.get_dtype(), list(piece.get_shape()))
    return tensors


def plan_merge(config: dict, adapter: dict, base: dict[str, tuple], where: Path) -> dict[str, dict]:
    """{base tensor name: what to do to it}: fold in a LoRA delta, replace it (modules_to_save), or add a bias."""
    from peft.utils.other import get_pattern_key

    modules: dict[str, dict] = {}
    replaced: dict[str, str] = {}
    for key in sorted(adapter):
        if not key.startswith(_PREFIX):
            raise InputError(f"{where}: tensor {key} does not start with {_PREFIX!r} (not a causal-LM adapter).")
        rest = key[len(_PREFIX):]
        for suffix, slot, kind in _LORA_SUFFIXES:
            if rest.endswith(suffix):
                entry = modules.setdefault(rest[:-len(suffix)], {})
                entry[slot] = key
                entry.setdefault("kind", kind)
                break
        else:  # a whole tensor saved with the adapter (modules_to_save, bias, saved embedding): it replaces the base's
            target = rest.replace(".base_layer.", ".")
            if ".lora_" in rest or target not in base:
                raise InputError(f"{where}: tensor {key} matches no base model tensor and no LoRA piece msov knows.")
            _check_shape(key, list(adapter[key].shape), target, base[target][2], where)
            replaced[target] = key
    ops: dict[str, dict] = {}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module, entry in modules.items():
        weight = module + ".weight"
        if "A" not in entry or "B" not in entry:
            raise InputError(f"{where}: {module} has only part of a LoRA pair ({', '.join(sorted(entry))}).")
        if weight not in base:
            raise InputError(f"{where}: the adapter targets {module}, but the base checkpoint has no tensor {weight}.",
                             hint="The base folder must be the one the adapter was trained on, in the same layout.")
        a, b = adapter[entry["A"]], adapter[entry["B"]]
        if a.ndim != 2 or b.ndim != 2:
            raise InputError(f"{where}: {module}: only LoRA on linear and embedding layers can be merged here.")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r"))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha"))
        if r != a.shape[0] or alpha is None:
            raise InputError(f"{where}: {module}: lora_A has rank {a.shape[0]}, adapter_config.json says {r}.")
        # rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r) so that higher ranks keep learning; PEFT does the same.
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        linear = entry["kind"] == "linear"
        _check_shape(module, [b.shape[0], a.shape[1]] if linear else [a.shape[1], b.shape[0]], weight,
                     base[weight][2], where)
        if "M" in entry and not linear:
            raise InputError(f"{where}: {module}: DoRA on an embedding layer is not supported by the streamed merge.")
        ops[weight] = {"A": entry["A"], "B": entry["B"], "M": entry.get("M"), "scale": scale, "linear": linear,
                       "replace": replaced.pop(weight, None)}
        if "bias" in entry:  # lora_bias: the B layer's bias, scaled like the delta, is added to the base bias
            if module + ".bias" not in base:
                raise InputError(f"{where}: {module} has a LoRA bias but the base layer has no bias.")
            ops[module + ".bias"] = {"bias": entry["bias"], "scale": scale, "replace": replaced.pop(module + ".bias",
                                                                                                  None)}
    ops.update({target: {"replace": key} for target, key in replaced.items()})
    return ops


def _check_shape(what: str, got: list, target: str, expected: list, where: Path) -> None:
    if list(got) != list(expected):
        raise InputError(f"{where}: {what} has shape {list(got)}, but base tensor {target} is {list(expected)} "
                         f"(a resized vocabulary, or another base model?).")


def _merged(name: str, op: dict | None, base_path: Path, adapter: dict):
    """One output tensor: the base tensor with its LoRA delta folded in, computed in float32."""
    import torch
    from safetensors import safe_open

    if op and op.get("replace"):
        weight = adapter[op["replace"]]
    else:
        with safe_open(base_path, "pt") as handle:  # one tensor per open: its mapped pages go when it is freed
            weight = handle.get_tensor(name)
    if not op or ("A" not in op and "bias" not in op):
        return weight
    w = weight.to(torch.float32)
    if "bias" in op:
        return w + adapter[op["bias"]].to(torch.float32) * op["scale"]
    a, b = adapter[op["A"]].to(torch.float32), adapter[op["B"]].to(torch.float32)
    # PEFT's get_delta_weight then `weight += delta`, as the same float operations (so fp32 results equal
    # merge_and_unload's), done in place in one buffer: a large matrix is allocated once, not three times.
    merged = b @ a if op["linear"] else (b @ a).T.contiguous()
    merged.mul_(op["scale"]).add_(w)
    if op["M"]:  # DoRA: magnitude / norm of the merged weight, per output row (PEFT's merge_unsafe)
        merged.mul_((adapter[op["M"]].to(torch.float32) / torch.linalg.norm(merged, dim=1)).view(-1, 1))
    return merged


def merge_into(base: Path, adapter_dir: Path, out: Path, *, dtype: str | None = None, shard_size: int = 5 * 10**9,
               config: dict | None = None, on_event: EventSink = no_events) -> dict:
    """Write the merged weights of base + adapter into the existing folder `out` (shards + index).

    `dtype` is a safetensors dtype (BF16, F16, F32) for floating tensors, or None to keep each tensor's own.
    Returns {"files": {name: sha256}, "tensors", "merged", "replaced", "total_size", "dtype"}.
    """
    import torch
    from safetensors.torch import load_file

    base, adapter_dir, out = Path(base), Path(adapter_dir), Path(out)
    config = config if config is not None else read_json(adapter_dir / "adapter_config.json")
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    tensors = base_tensors(base)
    ops = plan_merge(config, adapter, tensors, adapter_dir)

    # 1. plan: output dtype and bytes of every tensor, then shards filled in base order
    out_dtype = {n: (dtype if dtype and d in _FLOATS else d) for n, (_, d, _) in tensors.items()}
    unknown = sorted({d for d in out_dtype.values() if d not in _SIZES})
    if unknown:
        raise ModelFolderError(f"{base}: tensors of dtype {', '.join(unknown)} (quantized?); msov merges into "
                               f"full-precision weights only.")
    nbytes = {n: math.prod(shape) * _SIZES[out_dtype[n]] for n, (_, _, shape) in tensors.items()}
    shards: list[list[str]] = [[]]
    filled = 0
    for name in tensors:
        if shards[-1] and filled + nbytes[name] > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes[name]
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    # 2. each shard: header from the plan, then tensors written (and hashed) one at a time
    digests, weight_map = {}, {}
    for file_name, members in zip(names, shards):
        # Widest dtypes first keeps every tensor aligned to its element size, as safetensors itself orders them.
        members = sorted(members, key=lambda n: (-_SIZES[out_dtype[n]], n))
        header, offset = {}, 0
        for name in members:
            header[name] = {"dtype": out_dtype[name], "shape": tensors[name][2],
                            "data_offsets": [offset, offset + nbytes[name]]}
            offset += nbytes[name]
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        hasher = hashlib.sha256(struct.pack("<Q", len(raw)) + raw)
        with open(out / file_name, "wb") as handle, ThreadPoolExecutor(max_workers=1) as hashing:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            for name in members:
                tensor = _merged(name, ops.get(name), tensors[name][0], adapter)
                tensor = tensor.to(getattr(torch, _TORCH[out_dtype[name]])).contiguous()
                data = tensor.reshape(-1).view(torch.uint8).numpy()
                # sha256 and write both release the GIL: hashing beside the write hides most of its cost
                hashed = hashing.submit(hasher.update, data)
                handle.write(data)
                hashed.result()
                weight_map[name] = file_name
                del tensor, data
        digests[file_name] = hasher.hexdigest()
        on_event("stage", {"text": f"wrote {file_name}"})
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values()),
                              "total_parameters": sum(math.prod(s) for _, _, s in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    merged = sum(1 for op in ops.values() if "A" in op)
    return {"files": digests, "tensors": len(tensors), "merged": merged, "replaced": len(ops) - merged,
            "total_size": sum(nbytes.values()), "dtype": dtype}
