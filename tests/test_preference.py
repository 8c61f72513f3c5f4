"""DPO: the loss against TRL's recorded values, preference data to token pairs, training on a learnable preference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TRL = Path(__file__).resolve().parent / "trl_dpo"
RERECORD = ("re-record with bench/record_trl_dpo.py (its docstring says how: a separate venv with TRL, never a "
            "dependency of msov)")


@pytest.fixture(scope="module")
def trl_model():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TRL / "base", dtype="float32")
    model = PeftModel.from_pretrained(base, TRL / "adapter")
    model.eval()
    return model


def msov_rows(recorded: list[dict]) -> list[dict]:
    """TRL's prompt/chosen/rejected ids as msov's pair rows: the prompt's labels -100, the answer's its ids."""
    rows = []
    for row in recorded:
        prompt = row["prompt_ids"]
        rows.append({f"{side}_input_ids": prompt + row[f"{side}_ids"] for side in ("chosen", "rejected")}
                    | {f"{side}_labels": [-100] * len(prompt) + row[f"{side}_ids"] for side in ("chosen", "rejected")})
    return rows


@pytest.mark.parametrize("setting", ["sigmoid", "sigmoid_beta_0.5", "ipo", "sigmoid_smoothed"])
def test_dpo_loss_and_rewards_equal_trls(trl_model, setting):
    import torch

    from mistral_sov.train.preference import PairCollator, pair_logps, preference_loss

    record = json.loads((TRL / "trl_dpo.json").read_text())
    expected = record["settings"][setting]
    batch = PairCollator(pad_token_id=3)(msov_rows(record["rows"]))
    with torch.no_grad():
        pc, pr, rc, rr, nc, nr = pair_logps(trl_model, batch)
    loss_type = "ipo" if expected["trl_loss_type"] == "ipo" else "sigmoid"
    result = preference_loss(pc, pr, rc, rr, beta=expected["beta"], loss_type=loss_type,
                             label_smoothing=expected["label_smoothing"], chosen_tokens=nc, rejected_tokens=nr)
    if expected["pair_by_pair"]:  # recorded one pair at a time: compare pair by pair
        ours = {"loss": result.losses, "rewards_chosen": result.chosen_rewards,
                "rewards_rejected": result.rejected_rewards, "margins": result.margins,
                "accuracy": result.accuracies, "logps_chosen": pc, "logps_rejected": pr}
        ours = {key: value.tolist() for key, value in ours.items()}
    else:
        ours = {"loss": [result.loss.item()], "rewards_chosen": [result.chosen_rewards.mean().item()],
                "rewards_rejected": [result.rejected_rewards.mean().item()], "margins": [result.margins.mean().item()],
                "accuracy": [result.accuracies.mean().item()], "logps_chosen": [pc.mean().item()],
                "logps_rejected": [pr.mean().item()]}
    for key, values in ours.items():
        assert values == pytest.approx(expected[key], abs=1e-5), f"{setting} {key} differs from TRL's; {RERECORD}"
    # the fixed batch is not a degenerate one: the policy differs from the reference, pairs disagree
    assert abs(result.margins).min() > 1e-3


def test_reference_is_the_base_with_the_adapter_off(trl_model):
    """The reference log-probs are those of the base model itself, loaded alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_sov.train.preference import PairCollator, reference_model, sequence_logps

    record = json.loads((TRL / "trl_dpo.json").read_text())
    batch = PairCollator(pad_token_id=3)(msov_rows(record["rows"]))
    base = AutoModelForCausalLM.from_pretrained(TRL / "base", dtype="float32").eval()
    with torch.no_grad():
        alone, _ = sequence_logps(base, batch)
        policy, _ = sequence_logps(trl_model, batch)
    with reference_model(trl_model):
        reference, counts = sequence_logps(trl_model, batch)
    assert torch.equal(reference, alone)
    assert not torch.allclose(policy, reference)
    assert counts.tolist() == [3, 5, 7, 6, 2, 4]  # answer tokens: chosen rows first, then rejected


def test_preference_loss_refuses_unknown_losses_and_ipo_without_lengths():
    import torch

    from mistral_sov.train.preference import preference_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="chosen_tokens"):
        preference_loss(x, x, x, x, loss_type="ipo")
    # equal policy and reference: zero rewards, loss log 2 (sigmoid) and 1/(2·beta)² (ipo)
    assert preference_loss(x, x, x, x, beta=0.1).loss.item() == pytest.approx(0.693147, abs=1e-6)
    assert preference_loss(x, x, x, x, beta=0.1, loss_type="ipo", chosen_tokens=x + 3,
                           rejected_tokens=x + 2).loss.item() == pytest.approx(25.0)


# ---- preference data: rows to token pairs ------------------------------------------------------------------------

CHOSEN_END, REJECTED_END = " I have opened a ticket for you.", " Please call the helpdesk again."  # 8 tokens each




def preference_rows(n: int, seed: int) -> list[dict]:
    """Prompts and greetings from the helpdesk samples (the tiny tokenizer's own words); the chosen answer always
    ends with one sentence, the rejected one with another of as many tokens, the greetings drawn alike."""
    import random

    from conftest import SAMPLES

    rng = random.Random(seed)
    chats = [json.loads(line)["messages"] for line in (SAMPLES / "helpdesk_chat.jsonl").read_text().splitlines()]
    users = [m["content"] for chat in chats for m in chat if m["role"] == "user"]
    # Answers open with a greeting ("Hi Ada."): short and alike, so that what is learned about the endings is not
    # drowned in the log-probabilities of unrelated answers (the model's own preference is measured too).
    answers = sorted({m["content"].split(". ")[0] + "." for chat in chats for m in chat
                      if m["role"] == "assistant" and m["content"].startswith("Hi ")})
    rows = []
    for _ in range(n):
        first, second = rng.sample(answers, 2)
        rows.append({"prompt": rng.choice(users), "chosen": first + CHOSEN_END, "rejected": second + REJECTED_END})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_text_and_chat_pairs_tokenise_alike_with_the_answers_alone_supervised(tokenizer):
    from mistral_sov.data import tokenize_records

    text = {"prompt": "My laptop will not start.", "chosen": "Hold the power button.", "rejected": "Buy a new one."}
    chat = {"messages": [{"role": "user", "content": text["prompt"]}],
            "chosen": [{"role": "assistant", "content": text["chosen"]}],
            "rejected": [{"role": "assistant", "content": text["rejected"]}]}
    data = tokenize_records([text, chat], tokenizer, max_seq_len=128, preference=True)
    first, second = data.dataset[0], data.dataset[1]
    assert first == second  # a text prompt is the user's turn: the same chat-template path
    for side, answer in (("chosen", text["chosen"]), ("rejected", text["rejected"])):
        ids, labels = first[f"{side}_input_ids"], first[f"{side}_labels"]
        learned = [i for i, label in zip(ids, labels) if label != -100]
        assert answer in tokenizer.decode(learned) and text["prompt"] not in tokenizer.decode(learned)
        assert labels[:len(labels) - len(learned)] == [-100] * (len(labels) - len(learned))  # prompt masked
    # the prompt tokens are shared: the pair differs from where the answers begin
    assert first["chosen_input_ids"][:5] == first["rejected_input_ids"][:5]
    assert data.stats.rows_out == 2 and data.stats.tokens == sum(len(first[k]) * 2 for k in
                                                                 ("chosen_input_ids", "rejected_input_ids"))


def test_malformed_preference_rows_are_named_by_file_line_and_field(tmp_path):
    from mistral_sov.data import load_data_file
    from mistral_sov.errors import DataError

    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "Hello.", "rejected": ""},
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."}])
    with pytest.raises(DataError) as error:
        load_data_file(path, sft=False)
    message = str(error.value)
    assert f"{path}:2: rejected:" in message
    assert f"{path}:3: prompt: expected a list of messages" in message


def test_dpo_recipe_refuses_sft_data_and_sft_refuses_pairs(tiny_model, tmp_path, write_recipe):
    from conftest import small_recipe

    from mistral_sov.errors import DataError
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import prepare_inputs

    with pytest.raises(DataError, match="train.method: dpo learns from preference pairs"):
        prepare_inputs(load_recipe(write_recipe(small_recipe(tiny_model, tmp_path / "out", method="dpo"))))
    data = small_recipe(tiny_model, tmp_path / "out")
    data["data"] = {"train": str(write_jsonl(tmp_path / "p.jsonl", preference_rows(4, 0)))}
    with pytest.raises(DataError, match="not an SFT format"):
        prepare_inputs(load_recipe(write_recipe(data)))


# ---- training --------------------------------------------------------------------------------------------------


def live_parameter_count() -> int:
    """Every distinct parameter tensor alive in this process: a second copy of the model would double it."""
    import gc

    import torch

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and obj.device.type != "meta":
            seen[(obj.untyped_storage().data_ptr(), obj.storage_offset())] = obj.numel()
    return sum(seen.values())


@pytest.fixture(scope="module")
def dpo_run(tiny_model, tmp_path_factory):
    import yaml
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    root = tmp_path_factory.mktemp("dpo")
    data = small_recipe(tiny_model, root / "out", epochs=3, method="dpo", beta=0.1)
    data["data"] = {"train": str(write_jsonl(root / "train.jsonl", preference_rows(64, 1))),
                    "eval": str(write_jsonl(root / "eval.jsonl", preference_rows(32, 2)))}
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    counts = [live_parameter_count()]  # other tests' models, still alive in this process

    def on_event(kind, payload):
        if kind == "step" and len(counts) == 1:
            counts.append(live_parameter_count())

    record = finetune(load_recipe(root / "r.yaml"), on_event=on_event)
    return record, root, counts[1] - counts[0]


def own_preference(model_dir: Path, adapter: Path | None, rows_file: Path, tokenizer) -> float:
    """The share of pairs whose chosen answer the model itself finds likelier (summed answer log-probs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_sov.data import iter_records, tokenize_records
    from mistral_sov.train.preference import PairCollator, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    data = tokenize_records((r for _, r in iter_records(rows_file, "preference")), tokenizer, max_seq_len=192,
                            preference=True).dataset
    with torch.no_grad():
        logps, _ = sequence_logps(model, PairCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))]))
    chosen, rejected = logps.chunk(2)
    return (chosen > rejected).float().mean().item()


def test_dpo_learns_the_preferred_pattern_on_held_out_pairs(dpo_run, tiny_model, tokenizer):
    record, root, _ = dpo_run
    before, after = record.eval.before, record.eval.after
    # step 0: the policy is the reference (a fresh LoRA adds nothing), so every reward is exactly 0
    assert before.reward_margin == 0.0 and before.reward_accuracy == 0.0
    assert before.loss == pytest.approx(0.693147, abs=1e-6)  # log 2
    assert after.reward_accuracy > 0.9 and after.reward_margin > 1.0 and after.loss < 0.3, after
    # the model's own preference on held-out pairs: a coin toss before, the chosen answers after
    eval_file = root / "eval.jsonl"
    start = own_preference(tiny_model, None, eval_file, tokenizer)
    end = own_preference(tiny_model, root / "out" / "adapter", eval_file, tokenizer)
    print(f"held-out: reward accuracy {before.reward_accuracy} -> {after.reward_accuracy}, margin "
          f"{before.reward_margin} -> {after.reward_margin:.3f}, own preference {start:.3f} -> {end:.3f}")
    assert 0.25 <= start <= 0.75 and end > 0.9, (start, end)


def test_dpo_metrics_and_record_name_the_method(dpo_run):
    import yaml

    record, root, _ = dpo_run
    lines = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert steps[0]["rewards/margins"] == 0.0 and steps[0]["rewards/accuracies"] == 0.0
    assert steps[-1]["rewards/accuracies"] > 0.9 and steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(steps[-1])
    recipe = yaml.safe_load((root / "out" / "recipe.yaml").read_text())
    assert recipe["train"]["method"] == "dpo" and recipe["train"]["beta"] == 0.1
    assert record.data.train[0].format == "preference"
    assert record.eval.after.perplexity is None  # a DPO loss is no language-modelling loss


def test_the_reference_is_no_second_model(dpo_run):
    """During training, the parameters alive in the process are the run's model once (base plus LoRA), not
    twice: the reference is the same weights with the adapter off."""
    record, _, live = dpo_run
    assert live == record.parameters.total, (live, record.parameters.total)


def test_loss_plot_shows_the_rewards(dpo_run):
    from mistral_sov.train.loss_plot import loss_figure, loss_series

    record, root, _ = dpo_run
    lines = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    series = loss_series(lines, record.eval.before.loss, record.eval.after.loss, record.train.steps)
    figure = loss_figure(series)
    loss_axis, _lr, margin_axis, accuracy_axis = figure.axes
    assert loss_axis.get_ylabel().startswith("DPO loss")
    assert [list(zip(*line.get_data())) for line in margin_axis.lines] == [series["margins"]]
    assert [list(zip(*line.get_data())) for line in accuracy_axis.lines] == [series["accuracy"]]
    assert series["accuracy"][0] == (1, 0.0) and series["accuracy"][-1][1] > 0.9
    assert (root / "out" / "loss.png").is_file()


def test_dpo_resumed_after_a_crash_gives_the_uninterrupted_adapter(tiny_model, tmp_path, write_recipe):
    """Resume on CPU is bit-identical for DPO as for SFT: the checkpoint holds the adapter, optimizer, scheduler and
    RNG states, and the reference needs no state of its own (it is the base, with the adapter off)."""
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(48, 3))

    def recipe(out: str):
        data = small_recipe(tiny_model, tmp_path / out, max_steps=8, save_steps=4, method="dpo")
        data["lora"]["dropout"] = 0.1  # dropout draws random numbers: resuming must restore the RNG too
        data["data"] = {"train": str(train)}
        return load_recipe(write_recipe(data, f"{out}.yaml"))

    whole = finetune(recipe("whole"))

    def crash_at_step_6(kind, payload):
        if kind == "step" and payload["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(recipe("crashed"), on_event=crash_at_step_6)
    resumed = finetune(recipe("crashed"), resume=True)
    assert resumed.train.resumed_from_step == 4 and resumed.train.steps == 8
    assert resumed.parameters.trainable_sha256 == whole.parameters.trainable_sha256
    assert resumed.train.final_loss == whole.train.final_loss


def test_precomputed_reference_trains_as_the_live_one(tiny_model, tmp_path, write_recipe):
    """train.precompute_ref: the reference log-probs computed once before training are those the live reference
    pass gives (up to float rounding of other batch shapes), so the run learns the same."""
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(32, 4))
    held_out = write_jsonl(tmp_path / "eval.jsonl", preference_rows(16, 5))
    records = {}
    for precompute in (False, True):
        data = small_recipe(tiny_model, tmp_path / f"out-{precompute}", max_steps=6, method="dpo",
                            precompute_ref=precompute, logging_steps=1, eval_steps=3)
        data["data"] = {"train": str(train), "eval": str(held_out)}
        records[precompute] = finetune(load_recipe(write_recipe(data, f"{precompute}.yaml")))
    live, precomputed = records[False], records[True]
    assert precomputed.train.first_loss == pytest.approx(0.693147, abs=1e-6)  # rewards 0 at step 0 here too
    assert precomputed.train.final_loss == pytest.approx(live.train.final_loss, rel=1e-3, abs=1e-5)
    assert precomputed.eval.after.reward_margin == pytest.approx(live.eval.after.reward_margin, rel=1e-3)
    assert precomputed.eval.after.reward_accuracy == live.eval.after.reward_accuracy
    # the Trainer's own evaluation every eval_steps logs the held-out rewards too
    lines = [json.loads(line) for line in (tmp_path / "out-True" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in evals] == [3, 6]
    assert evals[-1]["eval_loss"] == pytest.approx(precomputed.eval.after.loss, abs=1e-5)
    assert evals[-1]["eval_rewards/accuracies"] == precomputed.eval.after.reward_accuracy


def test_precomputed_reference_columns_are_the_adapter_off_log_probs(trl_model):
    import torch
    from datasets import Dataset

    from mistral_sov.train.preference import PairCollator, pair_logps, with_reference_logps

    record = json.loads((TRL / "trl_dpo.json").read_text())
    rows = msov_rows(record["rows"])
    with_ref = with_reference_logps(trl_model, Dataset.from_list(rows), pad_token_id=3, batch_size=2)
    batch = PairCollator(pad_token_id=3)([with_ref[i] for i in range(len(with_ref))])
    live = PairCollator(pad_token_id=3)(rows)
    with torch.no_grad():
        _, _, rc, rr, _, _ = pair_logps(trl_model, batch)  # read from the batch: no reference pass
        _, _, live_rc, live_rr, _, _ = pair_logps(trl_model, live)
    assert torch.equal(batch["reference_logps"], torch.cat([rc, rr]))
    assert torch.allclose(rc, live_rc, atol=1e-5) and torch.allclose(rr, live_rr, atol=1e-5)
    assert trl_model.training is False  # left as it was found


def test_dpo_with_a_4bit_base(tiny_model, tmp_path, write_recipe):
    """QLoRA: the frozen base loaded in nf4 (bitsandbytes' CPU backend); the reference is that quantized base with
    the adapter off, so rewards start at exactly 0 there too, and the held-out pairs are learned."""
    pytest.importorskip("bitsandbytes")
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    data = small_recipe(tiny_model, tmp_path / "out", epochs=2, method="dpo")
    data["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    data["data"] = {"train": str(write_jsonl(tmp_path / "train.jsonl", preference_rows(48, 6))),
                    "eval": str(write_jsonl(tmp_path / "eval.jsonl", preference_rows(16, 7)))}
    record = finetune(load_recipe(write_recipe(data)))
    assert record.eval.before.reward_margin == 0.0 and record.eval.before.reward_accuracy == 0.0
    assert record.eval.after.reward_accuracy > 0.9, record.eval.after


def test_two_ranks_train_dpo_like_one_process(tiny_model, tmp_path):
    """DDP (torchrun, gloo, CPU): 2 ranks x 4 pairs learn as 1 process x 8; the reference pass runs through the
    DDP wrapper with the adapter off inside it, under no_grad (no gradient to synchronise)."""
    import yaml
    from conftest import small_recipe, two_ranks_then_one

    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", preference_rows(48, 8))),
             "eval": str(write_jsonl(tmp_path / "eval.jsonl", preference_rows(16, 9)))}
    for name, batch in (("ddp", 4), ("one", 8)):
        data = small_recipe(tiny_model, tmp_path / "runs" / name, max_steps=6, batch_size=batch, method="dpo")
        data["data"] = files
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    rank0, one = two_ranks_then_one(tmp_path, tmp_path / "ddp.yaml", tmp_path / "one.yaml")
    assert rank0["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-3, abs=1e-5)
    assert rank0["eval"]["after"]["reward_margin"] == pytest.approx(one["eval"]["after"]["reward_margin"], rel=1e-3)
    assert rank0["eval"]["before"]["reward_margin"] == 0.0


def test_signed_dpo_run_names_its_method_and_pairs_and_reproduces(tiny_model, tmp_path, cli):
    """The signed provenance holds the resolved recipe (train.method: dpo, beta) and the preference file by
    digest; `msov reproduce` re-trains it to the same adapter bytes."""
    import hashlib

    import yaml
    from conftest import small_recipe

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(24, 10))
    recipe = small_recipe(tiny_model, tmp_path / "run", max_steps=4, method="dpo", beta=0.2)
    recipe["data"] = {"train": [{"path": str(pairs), "format": "preference"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("keygen", "--out", tmp_path / "keys" / "signer").exit_code == 0
    trained = cli("finetune", tmp_path / "r.yaml", "--sign-key", tmp_path / "keys" / "signer.pem", "--json")
    assert trained.exit_code == 0, trained.output
    adapter = tmp_path / "run" / "adapter"
    build = json.loads((adapter / "msov" / "provenance.json").read_text())["predicate"]["buildDefinition"]
    train = build["externalParameters"]["recipe"]["train"]
    assert (train["method"], train["beta"], train["loss_type"]) == ("dpo", 0.2, "sigmoid")
    digests = {d["uri"]: d["digest"]["sha256"] for d in build["resolvedDependencies"] if "digest" in d}
    assert digests[pairs.as_uri()] == hashlib.sha256(pairs.read_bytes()).hexdigest()
    result = cli("reproduce", adapter, "--key", tmp_path / "keys" / "signer.pub", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "identical"
