"""The run record: every fact a finished run hands on, typed. `run.json` is its serialisation.

Export, registry, reproduce, provenance and the printers read these attributes, never dict keys: a field that is
renamed or missing is found here once, not as a `None` three modules later. A record that does not parse (an edited
or foreign run.json, one from a newer msov) is bad input, named with the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError, MsovError

SCHEMA = 1  # bump when a field changes meaning; from_json refuses records it cannot read


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BaseModelRef(_Part):
    path: str
    architecture: Optional[str] = None
    files: dict[str, str] = Field(default_factory=dict)  # relative name -> sha256, every file of the folder


class AdapterRef(_Part):
    """The LoRA adapter a run started from (model.adapter): its folder and the files training read, by digest."""

    path: str
    files: dict[str, str] = Field(default_factory=dict)  # adapter_config.json, adapter_model.safetensors -> sha256


class DataFileRef(_Part):
    path: str
    format: str
    rows: int
    sha256: str  # of the file's bytes (a `datasets` folder: of its files by name)


class ScanSummary(_Part):
    """What the personal-data and secrets scan found: counts only, never the findings."""

    files: int = 0
    rows: int = 0
    counts: dict[str, int] = Field(default_factory=dict)


class DataRefs(_Part):
    train: list[DataFileRef] = Field(default_factory=list)
    eval: list[DataFileRef] = Field(default_factory=list)
    scan: ScanSummary = Field(default_factory=ScanSummary)


class TokenStats(_Part):
    """What tokenising a split gave: rows in and out (and why rows were dropped), tokens, lengths."""

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
        return self.model_dump(mode="json")


class TokenRefs(_Part):
    train: TokenStats
    eval: Optional[TokenStats] = None


class Parameters(_Part):
    trainable: int
    total: int
    trainable_sha256: Optional[str] = None  # sha256 over the trained tensors in name order (equal on every rank)


class TrainResult(_Part):
    steps: int
    resumed_from_step: Optional[int] = None
    first_loss: Optional[float] = None
    final_loss: Optional[float] = None
    train_loss: Optional[float] = None  # the Trainer's mean since the (last) start
    tokens_seen: Optional[int] = None
    runtime_s: Optional[float] = None
    processes: int = 1
    fsdp: bool = False  # False when accelerate ran an FSDP launch as DDP (on CPU)


class EvalResult(_Part):
    loss: float
    perplexity: Optional[float] = None  # of a language-modelling loss; none for a preference (DPO) loss
    tokens: int
    # preference tuning: the share of held-out pairs whose chosen answer earns more reward, the mean margin
    reward_accuracy: Optional[float] = None
    reward_margin: Optional[float] = None


class EvalRefs(_Part):
    before: Optional[EvalResult] = None
    after: Optional[EvalResult] = None


class Sample(_Part):
    """The first held-out conversation cut before its last answer, answered before and after training."""

    prompt: list[dict]
    reference: Optional[str] = None
    before: Optional[str] = None
    after: Optional[str] = None


class SignatureRef(_Part):
    path: str
    key_hint: str


class ComputeRecord(_Part):
    """Training compute actually spent, in model FLOPs (model/compute.py states the count), and its share of the base
    model's pre-training compute when the user declared that (recipe model.base_training_flops or the flag)."""

    flops: float
    tokens_processed: int  # the Trainer's count over all ranks and every step (a resumed run's earlier ones too)
    supervised_tokens: int  # estimated: tokens_processed × the training data's supervised share
    attention_pairs: int  # estimated: tokens_processed × the training data's causal pairs per token
    total_parameters: int
    trainable_parameters: int
    frozen_matmul_parameters: Optional[int] = None  # None: the model's shape was unknown (see formula)
    lm_head_parameters: Optional[int] = None
    attention_width: Optional[int] = None  # layers × query width
    formula: str
    base_training_flops: Optional[float] = None
    ratio: Optional[float] = None  # flops / base_training_flops
    threshold: float = 1 / 3
    above_threshold: Optional[bool] = None  # ratio > threshold


class EgressControl(_Part):
    active: bool  # False when finetune ran as a library call outside the guard
    refused: int = 0
    refused_destinations: list[str] = Field(default_factory=list)  # host:port, the first ten


class ScanControl(_Part):
    """The personal-data and secrets policy the run applied, and what the scan counted."""

    action: Literal["warn"] = "warn"  # finetune warns and trains on the data as given
    fail_on: list[str] = Field(default_factory=list)  # kinds that would have stopped the run
    redact: bool = False  # whether findings were redacted before tokenising
    files: int = 0
    rows: int = 0
    counts: dict[str, int] = Field(default_factory=dict)


class Controls(_Part):
    """Evidence of the controls that ran, not only of how they were configured."""

    egress_guard: EgressControl
    offline_env: dict[str, Optional[str]] = Field(default_factory=dict)  # as os.environ held them when training ended
    scan: ScanControl = Field(default_factory=ScanControl)
    seed: int


class RunRecord(_Part):
    schema_version: int = Field(SCHEMA, alias="schema")
    status: Literal["complete"] = "complete"
    name: str
    run_dir: str
    adapter_dir: str
    recipe_digest: str
    seed: int
    base_model: BaseModelRef
    start_adapter: Optional[AdapterRef] = None  # model.adapter: the adapter training started from (None: fresh)
    data: DataRefs
    tokens: TokenRefs
    parameters: Parameters
    train: TrainResult
    eval: EvalRefs = Field(default_factory=EvalRefs)
    sample: Optional[Sample] = None
    versions: dict[str, Optional[str]] = Field(default_factory=dict)
    started_at: str
    finished_at: str
    wall_time_s: float
    signature: Optional[SignatureRef] = None
    adapter_digest: str  # the adapter folder's OMS subject digest: its id
    loss_plot: Optional[str] = None
    compute: Optional[ComputeRecord] = None  # None in records written before it was measured
    controls: Optional[Controls] = None

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, doc: object, *, source: str = "run.json") -> "RunRecord":
        if not isinstance(doc, dict):
            raise InputError(f"{source}: expected a JSON object (a run record), found {type(doc).__name__}.")
        schema = doc.get("schema", SCHEMA)  # records written before the field existed have the same shape
        if schema != SCHEMA:
            raise InputError(f"{source}: schema {schema!r}; this msov reads run records of schema {SCHEMA}.",
                             hint="Use the msov version that wrote the run (run.json: versions.msov).")
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise InputError(f"{source}: field '{field}': {first['msg']}{more}; not a run record msov can read.",
                             hint="run.json is written by `msov finetune`; an edited one cannot be used.") from None

    @classmethod
    def read(cls, path: Path) -> "RunRecord":
        return cls.from_json(read_json(path), source=str(path))

    def write(self, path: Path) -> None:
        Path(path).write_text(self.dumps(), encoding="utf-8")


def read_json(path: Path, *, error: type[MsovError] = InputError) -> dict:
    """A JSON object from a file msov reads as a record (run.json, adapter_config.json, an index), or `error`
    naming the file (and the line) when it is not UTF-8 JSON holding an object."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except RecursionError:  # an edited file of nested brackets, not a record
        raise error(f"{path}: not valid JSON (nested too deeply).") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, found {type(doc).__name__}.")
    return doc


class RankResult(_Part):
    """What a rank other than 0 returns: it trained the same adapter, and rank 0 alone publishes it."""

    status: Literal["complete"] = "complete"
    rank: int
    name: str
    trainable_sha256: str

    def to_json(self) -> dict:
        return self.model_dump(mode="json")
