"""Tokenizer and base weights from a local folder (safetensors only), and LoRA attached with PEFT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.packing import PACKED_ATTENTION, register_packed_attention
from ..errors import DataError, EnvironmentRefused, InputError, ModelFolderError
from ..guard.local import require_local_model
from ..recipe import LoraSection, ModelSection, QuantizationSection

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")
# Upper bounds for the sizes config.json sets, far above any published model (hidden 16k, vocab 256k, 126 layers,
# 256 experts, 10M context) and far below what makes even a meta-device build (Python objects per layer) or the
# plan's arithmetic absurd. Fields absent from a config are not checked; transformers applies its defaults.
_SIZE_LIMITS = {"hidden_size": 2**20, "intermediate_size": 2**22, "moe_intermediate_size": 2**22,
                "vocab_size": 2**24, "max_position_embeddings": 2**30, "num_hidden_layers": 1024,
                "num_attention_heads": 2**14, "num_key_value_heads": 2**14, "head_dim": 2**14,
                "num_local_experts": 1024, "num_experts": 1024, "num_experts_per_tok": 1024}


@dataclass
class ModelFolder:
    path: Path
    config: dict
    weight_files: list[Path]
    pickle_files: list[Path]

    @property
    def architecture(self) -> str:
        return ",".join(self.config.get("architectures") or [self.config.get("model_type", "?")])


def inspect_model_folder(ref: str, *, allow_pickle: bool = False, need_weights: bool = True) -> ModelFolder:
    """Check a model folder before loading anything: local, has a config, a tokenizer and safe weights."""
    path = require_local_model(ref)
    config_file = path / "config.json"
    if not config_file.is_file():
        from .mistral_native import is_native_folder

        if is_native_folder(path):
            raise ModelFolderError(f"{path}: a native Mistral folder (params.json, no config.json); msov trains "
                                   "from Hugging Face folders.",
                                   hint=f"Convert it once, streamed: `msov convert {path} --out FOLDER`, then "
                                        "point model.path at FOLDER.")
        raise ModelFolderError(f"{path}: no config.json; expected a Hugging Face model folder.")
    config = read_config(config_file)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelFolderError(
            f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}).",
            hint="Copy the tokenizer files from the model's release into the same folder as the weights.",
        )
    safe = sorted(path.glob("*.safetensors"))
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safe:
        if pickled and not allow_pickle:
            raise ModelFolderError(
                f"{path}: weights are pickle files ({', '.join(p.name for p in pickled[:3])}); msov loads "
                "safetensors only, because unpickling can run arbitrary code.",
                hint="Convert the weights to safetensors on a trusted machine, or set model.allow_pickle: true "
                "if you trust their origin.",
            )
        if not pickled and need_weights:
            raise ModelFolderError(f"{path}: no weight files (*.safetensors) found.")
    check_safetensors_headers(safe)
    return ModelFolder(path=path, config=config, weight_files=safe or pickled, pickle_files=pickled)


def read_config(config_file: Path) -> dict:
    """config.json parsed and its architecture and sizes checked, before transformers builds anything from it."""
    from ..record import read_json

    config = read_json(config_file, error=ModelFolderError)
    model_type = config.get("model_type")
    if "auto_map" not in config:  # remote-code models name their own classes; transformers checks those
        from transformers import __version__
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ModelFolderError(
                f"{config_file}: model_type: {model_type!r} is not an architecture transformers {__version__} "
                "knows.", hint="Check the field against the model's release, or upgrade transformers if the "
                "architecture is newer than it.")
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            _check_sizes(section, config_file)
    return config


def _check_sizes(config: dict, config_file: Path) -> None:
    for field, limit in _SIZE_LIMITS.items():
        value = config.get(field)
        if value is None and field in ("num_key_value_heads", "head_dim", "moe_intermediate_size"):
            continue  # null means "derive it", as transformers does
        if field in config and not (type(value) is int and 1 <= value <= limit):
            raise ModelFolderError(f"{config_file}: {field}: expected a whole number from 1 to {limit}, got "
                                   f"{value!r}.")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ModelFolderError(f"{config_file}: num_key_value_heads: {kv} does not divide num_attention_heads "
                               f"{heads}.")
    if heads and not config.get("head_dim") and config.get("hidden_size", heads) % heads:
        raise ModelFolderError(f"{config_file}: hidden_size: {config['hidden_size']} is not a multiple of "
                               f"num_attention_heads {heads} (and no head_dim is set).")


def check_safetensors_headers(files: list[Path]) -> None:
    """safetensors checks each header (size, JSON, offsets covering the file) when it opens it, mmap only."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelFolderError(f"{file}: not a readable safetensors file: {exc}",
                                   hint="The file is damaged or truncated; copy it again from the model's "
                                   "release and compare its sha256.") from None


def load_tokenizer(folder: ModelFolder, *, chat_template: str | None = None, trust_remote_code: bool = False,
                   of_record: str | None = None):
    """The folder's tokenizer; with mistral-common's encoder attached (`msov_mistral`) as the tokenizer of record
    for chat rows when the folder ships a Mistral tokenizer file, unless data.tokenizer says `template`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        folder.path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if chat_template:
        template_file = Path(chat_template)
        if not template_file.is_file():
            raise DataError(f"data.chat_template: file '{chat_template}' not found.")
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")
    from .mistral_native import load_mistral_tokenizer, mistral_tokenizer_file

    mistral_file = mistral_tokenizer_file(folder.path) if of_record != "template" else None
    if mistral_file is None and of_record == "mistral":
        raise ModelFolderError(f"data.tokenizer: mistral, but {folder.path} has no Mistral tokenizer file "
                               "(tekken.json or tokenizer.model.v*).",
                               hint="Copy it from the model's release, or remove data.tokenizer.")
    if mistral_file is not None:
        # Mistral's own encoder is the tokenizer of record for chat rows (data/tokens.py uses it when present).
        tokenizer.msov_mistral = load_mistral_tokenizer(mistral_file)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise EnvironmentRefused("quantization: bitsandbytes is not installed.",
                                 hint="pip install 'mistral_sov[qlora]', or remove the quantization section.") from None
    return bitsandbytes


def quantization_device() -> str:
    """Where transformers puts a bitsandbytes model: the current CUDA device when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_quantization(section: QuantizationSection, lora: LoraSection | None = None, *,
                       device: str | None = None) -> None:
    """Refuse, before any weight is read, QLoRA settings that bitsandbytes cannot run on this machine."""
    import torch

    bnb = _bitsandbytes()
    device = device or quantization_device()
    kind = device.split(":")[0]
    if section.compute_dtype == "float16" and kind == "cpu":
        raise InputError(
            "quantization.compute_dtype: float16 needs a CUDA GPU; on this CPU-only machine float16 matmuls are "
            "slow and nothing scales the loss to keep float16 gradients from underflowing.",
            hint="Use quantization.compute_dtype: bfloat16 (or float32) on CPU.")
    if lora is not None and section.bits == 8:
        _refuse_dora_on_8bit(lora, kind)
    supported = getattr(bnb, "supported_torch_devices", None)
    problem = None
    if supported is not None and kind not in supported:
        problem = f"its supported devices are {', '.join(sorted(supported))}"
    else:
        try:  # a 64x64 round trip through the backend's own kernels: milliseconds, and it fails where they're absent
            x = torch.randn(64, 64, device=device, dtype=getattr(torch, section.compute_dtype))
            if section.bits == 4:
                packed, state = bnb.functional.quantize_4bit(x, quant_type=section.quant_type,
                                                              compress_statistics=section.double_quant)
                bnb.functional.dequantize_4bit(packed, state)
            else:
                bnb.functional.int8_vectorwise_quant(x)
        except Exception as exc:  # noqa: BLE001 - any backend failure means the same thing to the user
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem:
        raise EnvironmentRefused(
            f"quantization.bits: {section.bits}-bit {section.quant_type if section.bits == 4 else 'int8'} loading "
            f"is not supported by bitsandbytes {bnb.__version__} on '{device}' ({problem}).",
            hint="Remove the quantization section to train plain LoRA in model.dtype, or run on a device "
            "bitsandbytes supports: a CUDA GPU, or a CPU with the tested bitsandbytes (see `msov doctor`).")


def _refuse_dora_on_8bit(lora: LoraSection, kind: str) -> None:
    if not lora.use_dora or kind == "cuda":
        return
    # Measured with bitsandbytes 0.50 / PEFT 0.21 on CPU: DoRA's weight-norm pass leaves the 8-bit layer's state
    # half-built and the second forward pass fails inside int8_mm_dequant. 4-bit DoRA trains fine there.
    raise InputError(
        f"lora.use_dora: DoRA on an 8-bit base (quantization.bits: 8) does not train on {kind} with "
        f"bitsandbytes {_bitsandbytes().__version__}.",
        hint="Use quantization.bits: 4 with DoRA, or set lora.use_dora: false to keep 8-bit.")


def quantization_config(section: QuantizationSection, *, fsdp: bool = False):
    """bitsandbytes' settings for `section`; `fsdp`: the run is launched for FSDP (train.engine.Engine.fsdp)."""
    import torch
    from transformers import BitsAndBytesConfig

    _bitsandbytes()  # fail here, by name, rather than deep inside from_pretrained
    compute = getattr(torch, section.compute_dtype)
    if section.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # FSDP shards floating-point tensors of one dtype only: under FSDP the packed 4-bit bytes are stored in the
    # compute dtype (bitsandbytes' FSDP-QLoRA recipe); the values, and so the training, are the same.
    storage = compute if fsdp else torch.uint8
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=section.quant_type,
                              bnb_4bit_use_double_quant=section.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=storage)


def load_model(folder: ModelFolder, section: ModelSection, *, quantization: QuantizationSection | None = None,
               gradient_checkpointing: bool = False, fsdp: bool = False):
    """The base weights, frozen for LoRA; `fsdp`: the run is launched for FSDP, which shards them once training
    starts (the quantized layout is chosen for it)."""
    import torch
    from transformers import AutoModelForCausalLM

    if quantization:
        check_quantization(quantization)
    dtype = quantization.compute_dtype if quantization else section.dtype
    if section.attn_implementation == PACKED_ATTENTION:
        register_packed_attention()  # transformers knows only its own names until then
    model = AutoModelForCausalLM.from_pretrained(
        folder.path,
        dtype=getattr(torch, dtype),
        quantization_config=quantization_config(quantization, fsdp=fsdp) if quantization else None,
        use_safetensors=None if section.allow_pickle else True,
        trust_remote_code=section.trust_remote_code,
        local_files_only=True,
        attn_implementation=section.attn_implementation,
    )
    # Training never reuses a KV cache, and a cache breaks packed-row attention masks (tests/test_packing.py fails
    # if this is lost).
    model.config.use_cache = False
    if quantization:
        from peft import prepare_model_for_kbit_training

        _keep_cpu_4bit_trainable(model)
        if not fsdp:  # it casts norms and embeddings to float32: FSDP could not shard the mix
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
            if not quantization.upcast_unquantized:
                _hold_in_compute_dtype(model, getattr(torch, quantization.compute_dtype))
    return model


def _hold_in_compute_dtype(model, dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the frozen parameters left unquantized (embeddings,
    norms, output head: 268M of Mistral-7B's, 0.5 GiB more in fp32) and so of the residual stream that flows from
    the embeddings: every saved activation and checkpointed layer input would be fp32 too. RMSNorm computes in
    fp32 internally either way, and the LoRA adapters, added later, stay fp32 (PEFT upcasts them).
    tests/test_long_context.py checks the loss curve against the upcast run's."""
    import torch

    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad and type(param).__name__ == "Parameter":
            param.data = param.data.to(dtype)


def _keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit weight for a faster kernel the first time the
    layer runs in eval mode (msov evaluates before training), and never unpacks it: from then on the layer runs
    through `gemv_4bit`, which has no autograd, so no gradient flows through the frozen base and LoRA layers
    below it silently stop learning. Turning the repacking off keeps the differentiable path (found by comparing
    gradients with and without an eval pass; tests/test_qlora.py checks it)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(section: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        bias=section.bias,
        task_type="CAUSAL_LM",
    )


def attach_lora(model, section: LoraSection, *, start: Path | None = None, reference: str | None = None):
    """LoRA on `model` as the recipe's lora section describes it: fresh, or with the weights of the adapter folder
    `start` (model.adapter, checked by inspect_start_adapter). `reference`: also load `start` a second time as a
    frozen adapter of that name, without dropout (the DPO reference of a run that starts from an adapter)."""
    from peft import get_peft_model

    if getattr(model, "is_loaded_in_8bit", False):
        _refuse_dora_on_8bit(section, next(model.parameters()).device.type)
    try:
        peft_model = get_peft_model(model, lora_config(section))
    except ValueError as exc:
        # PEFT says which target modules it could not find; keep its words, name our field.
        raise ModelFolderError(f"lora.target_modules: {exc}") from None
    if start is not None:
        load_start_adapter(peft_model, Path(start), "default")
        if reference:
            frozen = lora_config(section.model_copy(update={"dropout": 0.0}))
            frozen.inference_mode = True  # PEFT leaves an inference-mode adapter's parameters without gradients
            peft_model.add_adapter(reference, frozen)
            load_start_adapter(peft_model, Path(start), reference)
    return peft_model


def load_start_adapter(model, folder: Path, adapter_name: str) -> None:
    """The adapter's tensors into the PEFT model's adapter `adapter_name`, after checking that they are exactly the
    tensors that adapter has (names and shapes): an adapter made for a base of another shape is refused, naming the
    first tensor that differs."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        name = (missing or unexpected)[0]
        what = "has no tensor" if missing else "has a tensor"
        raise InputError(f"model.adapter: {weights} {what} '{name}' that the base model (model.path) with the recipe's "
                         f"lora section {'needs' if missing else 'does not have'} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected); the adapter was made for another base or lora section.",
                         hint="Start from an adapter trained on this base model with the same lora section.")
    for name, tensor in sorted(expected.items()):
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise InputError(f"model.adapter: {weights}: tensor '{name}' has shape {tuple(tensors[name].shape)}, but "
                             f"the base model (model.path) needs {tuple(tensor.shape)}; the adapter was trained on a "
                             "base of another shape.", hint="Start from an adapter trained on this base model.")
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    if [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]:  # names checked above; never expected
        raise InputError(f"model.adapter: {weights}: PEFT did not take every tensor ({result.unexpected_keys[:3]}).")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters."""
    if hasattr(model, "get_nb_trainable_parameters"):
        # PEFT counts a packed 4-bit weight as the parameters it holds, not as its uint8 storage elements.
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def lora_counts_without_weights(folder: ModelFolder, section: LoraSection) -> tuple[int, int]:
    """Trainable/total parameter counts from config.json alone, on the meta device: nothing is allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder.path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = attach_lora(model, section)
    return parameter_counts(peft_model)
