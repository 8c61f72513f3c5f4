"""The end of a run, on rank 0: provenance inside the adapter and the signature over it, loss.png, run.json, then
the atomic publish of OUT.partial/ as OUT/.

Everything is written before the rename, so nothing signed-looking is ever published for an unfinished run; the
checkpoints go only after it, so a kill before the publish can still resume.
"""

from __future__ import annotations

import shutil

from ..events import EventSink
from ..record import RunRecord, SignatureRef
from ..recipe import Recipe
from .run_folder import Target


def seal_adapter(record: RunRecord, recipe: Recipe, target: Target, sign_key: str | None,
                 on_event: EventSink) -> RunRecord:
    """Write the provenance into adapter/, then sign the folder (adapter.sig beside it) or, unsigned, describe it.
    Returns the record with the adapter's digest (and the signature) filled in."""
    from ..export.bom import write_bom
    from ..trust.hashing import folder_digest
    from ..trust.oms import sign_folder
    from ..trust.provenance import write_provenance

    adapter = target.work_dir / "adapter"
    on_event("stage", {"text": "writing provenance" + (" and signing" if sign_key else "")})
    write_provenance(adapter, record, recipe.model_dump(mode="json"))  # reads no digest or signature: none yet
    write_bom(adapter)  # after the provenance it is made from, before the signature that covers it
    if not sign_key:
        return record.model_copy(update={"adapter_digest": folder_digest(adapter)})
    signed = sign_folder(adapter, sign_key, sig_path=target.work_dir / "adapter.sig")
    signature = SignatureRef(path=str(target.out_dir / "adapter.sig"), key_hint=signed["key_hint"])
    return record.model_copy(update={"signature": signature, "adapter_digest": signed["subject_digest"]})


def draw_loss_plot(record: RunRecord, metrics: list[dict], target: Target, on_event: EventSink) -> RunRecord:
    """loss.png beside run.json. A picture is not worth a finished run: failing to draw it is a warning."""
    from .loss_plot import write_loss_plot

    evals = record.eval
    # a preference run's held-out rewards before (step 0) and after training, beside the Trainer's eval_steps ones
    rewards = [(step, result.reward_margin, result.reward_accuracy)
               for step, result in ((0, evals.before), (record.train.steps, evals.after))
               if result is not None and result.reward_margin is not None]
    try:
        write_loss_plot(target.work_dir / "loss.png", metrics,
                        eval_before=evals.before.loss if evals.before else None,
                        eval_after=evals.after.loss if evals.after else None,
                        final_step=record.train.steps, title=f"{record.name}: loss and learning rate",
                        held_out_rewards=rewards)
    except Exception as exc:  # noqa: BLE001 - matplotlib can fail in many ways (fonts, cache dir); none matter here
        on_event("warning", {"text": f"loss.png was not drawn: {type(exc).__name__}: {exc}"})
        return record
    return record.model_copy(update={"loss_plot": str(target.out_dir / "loss.png")})


def publish(record: RunRecord, target: Target) -> None:
    """run.json written, OUT.partial/ renamed to OUT/, then the checkpoints removed."""
    from ..export.stage import publish_run

    record.write(target.work_dir / "run.json")
    publish_run(target.work_dir, target.out_dir)
    shutil.rmtree(target.out_dir / "checkpoints", ignore_errors=True)
