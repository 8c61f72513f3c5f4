"""How this process trains: alone, or as one rank of a DDP, FSDP or DeepSpeed launch, behind one `Engine`.

msov launches nothing: `accelerate launch --config_file recipes/accelerate/fsdp.yaml -m mistral_sov finetune ...`
sets ACCELERATE_USE_FSDP=true and FSDP_* variables for every rank, and the Trainer's Accelerator shards the model
when training starts. Before that the model is whole on rank 0 (and on the others unless
fsdp_cpu_ram_efficient_loading leaves them empty until FSDP broadcasts rank 0's weights); after it, every
trained tensor is a shard (a DTensor under FSDP2), so the digest, the saved adapter and generation go through
the Engine's methods.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import InputError, MsovError
from .ranks import rank, world_size


@dataclass(frozen=True)
class Engine:
    """The launch this process is part of, read from accelerate's environment once, at the start of a run."""

    fsdp: bool  # launched for FSDP (on a machine without GPU accelerate runs it as DDP: see `sharded`)
    deepspeed: bool
    rank: int
    processes: int

    @classmethod
    def from_environment(cls) -> "Engine":
        return cls(fsdp=fsdp_requested(), deepspeed=_deepspeed_requested(), rank=rank(), processes=world_size())

    @property
    def is_main(self) -> bool:
        """Rank 0: it checks, writes and publishes; the other ranks train the same adapter."""
        return self.rank == 0

    def place(self, model):
        """Put the model on this rank's GPU before the Trainer would (it does so only when training starts), so
        that the evaluation before training does not run, say, a 7B model on the CPU. bitsandbytes already placed
        a quantized model; FSDP and DeepSpeed place (and shard) the weights themselves, from the CPU copy."""
        import torch

        if not torch.cuda.is_available() or self.fsdp or self.deepspeed:
            return model
        if getattr(model.config, "quantization_config", None) is not None:
            return model
        return model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))

    @staticmethod
    def sharded(model_wrapped) -> bool:
        """Did FSDP (1 or 2) shard the module the Trainer trained through (None before training: no)? False when
        accelerate ran an FSDP launch as DDP (on CPU)."""
        return _is_sharded(model_wrapped)

    def gather_adapter(self, model_wrapped, model) -> "GatheredAdapter":
        """The trained tensors, whole on every rank (a collective under FSDP and ZeRO-3: every rank calls it)."""
        sharded = self.sharded(model_wrapped)
        partitioned = sharded or _zero3_partitioned(model)
        return GatheredAdapter(tensors=trained_tensors(model_wrapped if sharded else model), partitioned=partitioned)

    def generation_context(self, model_wrapped):
        """Where `model.generate` may run: under FSDP, with the root's own parameters gathered (nothing to do
        before training, `model_wrapped` None, or for any other engine)."""
        return _whole_root(model_wrapped)


@dataclass
class GatheredAdapter:
    tensors: dict  # PEFT's names -> whole tensors
    partitioned: bool  # the model's own state_dict() holds shards: save these tensors instead

    @cached_property
    def sha256(self) -> str:
        return trainable_digest(self.tensors)

    def save(self, model, folder: Path) -> None:
        """The adapter in plain PEFT format (adapter_config.json, adapter_model.safetensors)."""
        model.save_pretrained(folder, **({"state_dict": self.tensors} if self.partitioned else {}))


def trainable_digest(tensors: dict) -> str:
    """sha256 over the trained (LoRA) tensors in name order: equal on every rank of a correct DDP or FSDP run."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def quiet_deepspeed_on_cpu() -> None:
    """accelerate imports DeepSpeed whenever it is installed (unwrapping any model), and DeepSpeed then announces
    "Setting accelerator to CPU" on stdout; a single-process CPU run says so up front instead."""
    if world_size() <= 1 and "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def fsdp_requested() -> bool:
    """Is this rank launched for FSDP? The same test accelerate itself makes (accelerate/accelerator.py)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(quantization, *, on_cuda: bool | None = None) -> str | None:
    """Refuse, before any weight is read, what FSDP cannot shard; return a warning when FSDP will not shard at all.

    Sharded QLoRA needs 4-bit weights whose packed storage has the model's float dtype (bitsandbytes'
    `quant_storage`, set by `model.load.quantization_config` under FSDP): FSDP shards floating-point tensors only.
    msov gathers the adapter and generates through FSDP2's per-parameter shards, so FSDP1 is refused too.
    """
    if not fsdp_requested():
        return None
    if os.environ.get("FSDP_VERSION", "1") != "2":  # accelerate's default when the config does not say
        raise InputError(
            f"FSDP version {os.environ.get('FSDP_VERSION', '1')} (FSDP_VERSION) is not supported: msov gathers the "
            "adapter and generates its sample through FSDP2's per-parameter shards.",
            hint="Set fsdp_version: 2 in the accelerate config, as recipes/accelerate/fsdp.yaml does.")
    if quantization is not None and quantization.bits != 4:
        # Measured (torch 2.13, bitsandbytes 0.50.2): FSDP2 turns Int8Params into plain parameters, and the first
        # forward pass fails in Linear8bitLt.forward with "'Parameter' object has no attribute 'CB'".
        raise InputError(
            f"quantization.bits: {quantization.bits}-bit weights cannot be sharded by FSDP: it replaces bitsandbytes' "
            "int8 parameters with plain ones and the 8-bit layers fail on the first step. FSDP + QLoRA is "
            "supported with 4-bit weights only.",
            hint="Use quantization.bits: 4 (under FSDP msov stores the packed 4-bit weights in "
            "quantization.compute_dtype, as FSDP needs), or keep 8-bit with recipes/accelerate/ddp.yaml.")
    if on_cuda is None:
        import torch

        on_cuda = torch.cuda.is_available()
    if on_cuda:
        return None
    # accelerate 1.15 (AcceleratorState.__init__ in accelerate/state.py) turns FSDP on only for accelerator
    # device types; a CPU launch stays MULTI_CPU and the Trainer wraps the model in DDP instead.
    return ("FSDP was asked for (ACCELERATE_USE_FSDP=true) but this machine has no GPU: accelerate runs it as "
            "plain data parallel (DDP), every rank holding the whole model. The adapter is the same.")


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _is_sharded(model) -> bool:
    """Is `model` (or the module the Trainer wrapped it in) managed by FSDP 1 or 2?"""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return False

    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def _zero3_partitioned(model) -> bool:
    """Are `model`'s parameters DeepSpeed ZeRO-3 partitions? Each rank then holds a slice of every parameter
    (`param.data` is empty outside a forward pass), so reading or saving them needs a gather first."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


def trained_tensors(model) -> dict:
    """The trained (adapter) tensors by name, whole on every rank.

    Under FSDP and DeepSpeed ZeRO-3 this gathers them (a collective: every rank must call it, in step) without
    gathering the frozen base; elsewhere it is the parameters themselves. The names are PEFT's, as
    `named_parameters` gives them.
    """
    if not _is_sharded(model):
        trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
        if not _zero3_partitioned(model):
            return _whole({name: param.detach() for name, param in trained.items()})
        import deepspeed

        # ZeRO-3: gather only the trained tensors, on every rank, and copy them out before they are released
        with deepspeed.zero.GatheredParameters(list(trained.values()), modifier_rank=None):
            return _whole({name: param.detach().clone() for name, param in trained.items()})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    return _whole({name: tensor.detach() for name, tensor in get_model_state_dict(model, options=options).items()})


def _whole(tensors: dict) -> dict:
    """Refuse to go on with an adapter that is still a slice: an engine msov does not know sharded it (measured:
    DeepSpeed ZeRO-3 before msov gathered it published 28 tensors of shape (0,), and PEFT only warned)."""
    empty = [name for name, tensor in tensors.items() if tensor.numel() == 0]
    if empty or not tensors:
        raise MsovError(f"the trained adapter is not whole on this rank ({len(empty)} of {len(tensors)} tensors "
                        f"are empty{', e.g. ' + empty[0] if empty else ''}): the distributed engine holds it in "
                        "pieces msov cannot gather. Nothing was published.",
                        hint="Use one of the configs in recipes/accelerate/ (DDP, FSDP2, DeepSpeed ZeRO-2/3).")
    return tensors


@contextmanager
def _whole_root(model):
    """Generation calls the inner model, not the root FSDP module whose hook would gather its own parameters
    (embeddings, final norm, LM head): gather them for the duration. Layers below gather themselves."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
