"""Mistral's own tokenizer (mistral-common) as the tokenizer of record for Mistral models.

mistral-common is imported only here and only when a Mistral tokenizer file is in play: it is heavy-ish and
`msov --help` must stay fast.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..errors import DataError, EnvironmentRefused, ModelFolderError

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
    for i, message in enumerate(messages):
        try:
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # sentencepiece's C++ binding would fail with a bare RuntimeError on a lone surrogate.
            raise DataError(f"conversation {number} ({_opening(messages)}): message {i} holds text that is not "
                            "valid Unicode (a lone surrogate)", hint="Fix the text's encoding.") from None
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


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation ending with a user turn, as mistral-common encodes it for the model to answer: generation
    prompts then match what training encoded, not what a chat template approximates."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai([{k: v for k, v in m.items() if k != "weight"} for m in messages])
    # The tokenizer is loaded in finetuning mode, whose validator wants an answer last; a prompt has none.
    instruct_request = tokenizer._instruct_request_normalizer.from_chat_completion_request(request)
    return tokenizer.instruct_tokenizer.encode_instruct(instruct_request).tokens


def _opening(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return f"starting {users[0][:40]!r}" if users and users[0] else "empty"


# Native (mistral-inference / mistral-finetune) names against Hugging Face's, as transformers'
# convert_mistral_weights_to_hf.py maps them; {} is the layer number.
_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def is_native_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and not (folder / "config.json").is_file()


def hf_name(native: str) -> str | None:
    if native in _TOP_NAMES:
        return _TOP_NAMES[native]
    parts = native.split(".")
    if parts[0] == "layers" and len(parts) >= 4:
        inner = ".".join(parts[2:-1])
        if inner in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[inner]}.{parts[-1]}"
    return None


def config_from_params(params: dict, where: Path) -> dict:
    if not isinstance(params, dict):
        raise ModelFolderError(f"{where}: params.json is not a JSON object")
    for field in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size", "n_kv_heads", "head_dim"):
        value = params.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 24:
            raise ModelFolderError(f"{where}: params.json field {field} is {value!r}; expected a positive integer")
    if params.get("dim", 0) % params.get("n_heads", 1) or params.get("n_heads", 0) % params.get("n_kv_heads", 1):
        raise ModelFolderError(f"{where}: params.json dim={params.get('dim')} n_heads={params.get('n_heads')} "
                               f"n_kv_heads={params.get('n_kv_heads')}; expected dim divisible by n_heads and "
                               "n_heads by n_kv_heads")
    try:
        heads, dim = params["n_heads"], params["dim"]
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": dim,
                "intermediate_size": params["hidden_dim"], "num_hidden_layers": params["n_layers"],
                "num_attention_heads": heads, "num_key_value_heads": params.get("n_kv_heads", heads),
                "head_dim": params.get("head_dim", dim // heads), "rms_norm_eps": params["norm_eps"],
                "vocab_size": params["vocab_size"], "rope_theta": params.get("rope_theta", 10000.0),
                "sliding_window": params.get("sliding_window"), "tie_word_embeddings": False,
                "max_position_embeddings": params.get("max_seq_len", params.get("max_position_embeddings", 32768)),
                "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "dtype": "bfloat16"}
    except KeyError as exc:
        raise ModelFolderError(f"{where}: params.json has no field {exc}; expected dim, n_layers, n_heads, "
                               "hidden_dim, norm_eps, vocab_size (mistral-inference's params.json)") from None


def params_from_config(config: dict) -> dict:
    heads = config["num_attention_heads"]
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
              "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
              "hidden_dim": config["intermediate_size"], "n_heads": heads,
              "n_kv_heads": config.get("num_key_value_heads", heads), "norm_eps": config["rms_norm_eps"],
              "vocab_size": config["vocab_size"], "rope_theta": config.get("rope_theta", 10000.0)}
    if config.get("sliding_window"):
        params["sliding_window"] = config["sliding_window"]
    return params


def _permute(weight, heads: int, to_hf: bool):
    """Rotary halves: native interleaves the pairs of each head, Hugging Face splits them into two halves."""
    rows, cols = weight.shape
    if to_hf:
        return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _stream(plan: list[tuple[Path, str, str, object]], out_file: Path) -> str:
    """Write one safetensors file tensor by tensor (header planned from the sources' headers), hashing as it
    goes: memory is one tensor, whatever the model. plan: (source file, source name, output name, transform)."""
    import hashlib
    import struct

    from safetensors import safe_open

    header, offset = {}, 0
    for source, name, out_name, _ in plan:
        with safe_open(source, "pt") as handle:
            piece = handle.get_slice(name)
            dtype, shape = piece.get_dtype(), piece.get_shape()
        if dtype not in _SIZES:
            raise ModelFolderError(f"{source}: tensor {name} is {dtype}; expected a full-precision float")
        size = _SIZES[dtype] * math.prod(shape)
        header[out_name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    hasher = hashlib.sha256(struct.pack("<Q", len(raw)) + raw)
    with open(out_file, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for source, name, _, transform in plan:
            import torch

            with safe_open(source, "pt") as handle:
                tensor = handle.get_tensor(name)
            tensor = (transform(tensor) if transform else tensor).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            hasher.update(data)
            out.write(data)
            del tensor, data
    return hasher.hexdigest()


def _names(files: list[Path]) -> list[tuple[Path, str]]:
    from safetensors import SafetensorError, safe_open

    found = []
    for path in files:
        try:
            with safe_open(path, "pt") as handle:
                found += [(path, name) for name in handle.keys()]
        except (SafetensorError, OSError) as exc:
            raise ModelFolderError(f"{path}: not a readable safetensors file ({exc})") from None
    return found


def convert_native(src: Path, out: Path) -> dict:
    """A native Mistral folder (consolidated.safetensors + params.json + tokenizer file) as a Hugging Face folder
    written into the existing folder `out`. Returns the digests of what was read and what was written."""
    from ..trust.hashing import sha256_file

    src, out = Path(src), Path(out)
    weights = src / "consolidated.safetensors"
    if not weights.is_file():
        pickled = sorted(src.glob("consolidated*.pth"))
        if pickled:
            raise ModelFolderError(f"{src}: weights are pickle files ({pickled[0].name}); msov reads safetensors "
                                   "only, because unpickling can run arbitrary code.",
                                   hint="Use the release's consolidated.safetensors.")
        raise ModelFolderError(f"{src}: no consolidated.safetensors; expected a native Mistral folder "
                               "(consolidated.safetensors, params.json, tekken.json or tokenizer.model.v*).")
    tokenizer = mistral_tokenizer_file(src)
    if tokenizer is None:
        raise ModelFolderError(f"{src}: no Mistral tokenizer file (tekken.json or tokenizer.model.v*).")
    for path in (src, weights, src / "params.json", tokenizer):
        if path.is_symlink():
            raise ModelFolderError(f"{path}: is a symlink; msov reads only the folder's own files, so what is "
                                   "digested is what is converted.", hint="Copy the file into the folder.")
    try:
        params = json.loads((src / "params.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFolderError(f"{src / 'params.json'}: not readable JSON ({exc})") from None
    config = config_from_params(params, src / "params.json")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    plan = []
    for path, name in _names([weights]):
        target = hf_name(name)
        if target is None:
            raise ModelFolderError(f"{weights}: tensor {name!r} has no Hugging Face Mistral counterpart "
                                   "(vision, MoE and LoRA tensors are not converted).")
        if target.startswith("model.layers.") and int(target.split(".")[2]) >= config["num_hidden_layers"]:
            raise ModelFolderError(f"{weights}: tensor {name!r} is past the n_layers="
                                   f"{config['num_hidden_layers']} that params.json declares.")
        plan.append((path, name, target, _rotary_order(target, heads, kv, to_hf=True)))
    written = {"model.safetensors": _stream(plan, out / "model.safetensors")}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(tokenizer, out / tokenizer.name)
    read = {name: sha256_file(src / name) for name in ("consolidated.safetensors", "params.json", tokenizer.name)}
    record = {"converted_from": "mistral native", "read": read, "written": written,
              "mapping": "transformers convert_mistral_weights_to_hf (q/k rotary permutation)"}
    (out / "msov-convert.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _rotary_order(hf_name: str, heads: int, kv_heads: int, *, to_hf: bool):
    """Mistral's native q/k projections interleave the rotary halves that Hugging Face's keep apart: those two
    tensors are permuted (by their own head counts), every other tensor is copied as it is."""
    if hf_name.endswith("q_proj.weight"):
        return lambda tensor: _permute(tensor, heads, to_hf)
    if hf_name.endswith("k_proj.weight"):
        return lambda tensor: _permute(tensor, kv_heads, to_hf)
    return None


def write_native(hf_folder: Path, config: dict, out: Path) -> dict[str, str]:
    """The Hugging Face weights in `hf_folder` as consolidated.safetensors + params.json in `out` (the inverse
    mapping of convert_native). Returns {file: sha256} of the weights written."""
    hf_folder = Path(hf_folder)
    inverse = {v: k for k, v in _TOP_NAMES.items()}
    for native, hf in _LAYER_NAMES.items():
        inverse[hf] = native
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    plan = []
    for path, name in _names(sorted(hf_folder.glob("*.safetensors"))):
        parts = name.split(".")
        if name in inverse:
            target = inverse[name]
        elif name.startswith("model.layers.") and ".".join(parts[3:-1]) in inverse:
            target = f"layers.{parts[2]}.{inverse['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            raise ModelFolderError(f"{path}: tensor {name!r} has no native Mistral counterpart.")
        plan.append((path, name, target, _rotary_order(name, heads, kv, to_hf=False)))
    digest = _stream(plan, out / "consolidated.safetensors")
    (out / "params.json").write_text(json.dumps(params_from_config(config), indent=2) + "\n")
    return {"consolidated.safetensors": digest}


def native_layout(folder: Path, config: dict, base: Path) -> dict[str, str]:
    """Replace the Hugging Face weights and config in `folder` by consolidated.safetensors + params.json + the
    base's Mistral tokenizer file. Returns {file: sha256} of the weights."""
    tokenizer = mistral_tokenizer_file(Path(base))
    if tokenizer is None:
        raise ModelFolderError(f"{base}: no Mistral tokenizer file (tekken.json or tokenizer.model.v*), which a "
                               "native Mistral export must carry.", hint="Export with --format hf.")
    folder = Path(folder)
    hf_weights = sorted(folder.glob("*.safetensors"))
    digests = write_native(folder, config, folder)
    for path in hf_weights + [folder / "model.safetensors.index.json", folder / "config.json",
                              folder / "generation_config.json"]:
        path.unlink(missing_ok=True)
    if not (folder / tokenizer.name).is_file():
        shutil.copyfile(tokenizer, folder / tokenizer.name)
    return digests
