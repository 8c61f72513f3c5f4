"""Every printer and formatter of the CLI: what a person sees on the screen. Library code never prints.

Each printer is `print_x(console, result, ...)`, called by `base.emit` when --json is not given. Lines that are
plain text columns (paths, digests) go through `print` rather than rich, so that a path is written exactly as
given: rich would read `[...]` in it as markup and `:name:` as an emoji. Tables and progress bars import rich's
renderables inside the printer that needs them, so that importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

UNITS = ("B", "KiB", "MiB", "GiB")


def size(count: float) -> str:
    """A byte count for people, in binary units (as `msov plan --gpu-mem 24GB` means 24 GiB): '1.50 GiB'."""
    for unit in UNITS:
        if abs(count) < 1024 or unit == UNITS[-1]:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:,.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def num(value, digits: int = 4) -> str:
    """A measured number (loss, perplexity) to `digits` decimals; '-' when it was not measured."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


class TrainingProgress:
    """A rich progress bar fed by the library's events: step, loss, tokens/s, ETA."""

    def __init__(self, console, on_other_event):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.on_other_event = on_other_event
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def on_event(self, kind: str, payload: dict) -> None:
        if kind == "train_begin":
            self.progress.start()
            self.task = self.progress.add_task("train", total=payload["max_steps"],
                                               completed=payload["start_step"], loss="-", tps="-")
        elif kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=payload["step"], tps=f"{payload['tokens_per_s']:,.0f}")
        elif kind == "log" and self.task is not None and "loss" in payload:
            self.progress.update(self.task, loss=num(payload["loss"]))
        elif kind == "train_end":
            self.progress.stop()
        else:
            self.on_other_event(kind, payload)


# --- machine: version, tiny-model, plan, doctor, convert ---------------------------------------------------------

def print_versions(console, versions: dict) -> None:
    for key, value in versions.items():
        print(f"{key:13} {value}")


def print_digests(console, result: dict) -> None:
    for name, digest in result["files"].items():
        print(f"{digest[:16]}  {name}")


def print_plan(console, report: dict) -> None:
    from rich.table import Table

    m, p, s = report["model"], report["parameters"], report["settings"]
    experts = f", {m['experts']} experts (top-{m['experts_per_token']})" if m["experts"] > 1 else ""
    console.print(f"model          {escape(m['path'])} ({m['architecture']}: {m['layers']} layers, hidden "
                  f"{m['hidden']}, vocab {m['vocab']}{experts})")
    console.print(f"parameters     {p['total']:,} total; {p['trainable']:,} trainable "
                  f"({100 * p['trainable'] / p['total']:.3f}%)")
    if p["quantized"]:
        held = s["quantization"].rsplit("unquantized parameters ", 1)[-1]
        console.print(f"quantized      {p['quantized']:,} in nn.Linear layers; {p['not_quantized']:,} stay "
                      f"unquantized (embeddings, norms, output head, fused MoE experts) and are held in {held}")
    _print_settings(console, s)
    mem = report["memory"]
    table = Table(show_edge=False, title="estimated peak memory of one training step")
    table.add_column("part")
    table.add_column("memory", justify="right")
    rows = [("base weights", "weights"), ("LoRA weights", "lora"), ("gradients", "gradients"),
            ("optimizer states", "optimizer"), ("activations", "activations"), ("loss over the vocabulary", "logits"),
            ("attention mask", "attention_mask"), ("backward workspace", "workspace"),
            ("CUDA context + allocator slack", "runtime_overhead")]
    for label, key in rows:
        table.add_row(label, size(mem[key]))
    table.add_row("[bold]total[/]", f"[bold]{size(mem['total'])}[/]")
    console.print(table)
    console.print(f"activations    {size(mem['activations_without_checkpointing'])} without gradient checkpointing, "
                  f"{size(mem['activations_with_checkpointing'])} with it")
    if mem.get("offloaded_to_host"):
        console.print(f"offloaded      {size(mem['offloaded_to_host'])} of checkpointed layer inputs wait in host "
                      "memory (pinned), not counted above")
    budget = report["budget"]
    if report["verdict"] == "fits":
        console.print(f"[bold green]fits[/] in {size(budget['bytes'])} ({escape(budget['source'])}), "
                      f"{size(report['headroom'])} to spare")
        return
    console.print(f"[bold red]does not fit[/] in {size(budget['bytes'])} ({escape(budget['source'])}): "
                  f"{size(-report['headroom'])} short")
    fix = report["suggestion"]
    if fix:
        sets = " ".join(f"--set {item}" for item in fix["set"])
        console.print(f"cheapest fix   {escape(fix['change'])} -> {size(fix['estimated'])}")
        console.print(f"               {escape(sets)}")
    else:
        console.print("no recipe change makes it fit: the base weights alone need "
                      f"{size(mem['weights'])}; use a GPU with more memory or shard the model across GPUs (FSDP)")


def _print_settings(console, s: dict) -> None:
    ckpt = "on" if s["gradient_checkpointing"] else "off"
    if s["gradient_checkpointing"] and s.get("offload_activations"):
        ckpt += ", offloaded to CPU"
    console.print(f"settings       {s['quantization']}; batch {s['batch_size']} x {s['max_seq_len']} tokens; "
                  f"gradient checkpointing {ckpt}; {s['optimizer']}; attention {s.get('attn_implementation')}")


def print_max_seq_len(console, report: dict) -> None:
    m, s, longest = report["model"], report["settings"], report["longest"]
    console.print(f"model          {escape(m['path'])} ({m['architecture']}: {m['layers']} layers, hidden "
                  f"{m['hidden']}, vocab {m['vocab']})")
    _print_settings(console, s)
    budget = size(longest["budget"])
    if longest["max_seq_len"]:
        console.print(f"[bold]longest sequence[/] that fits {budget}: [bold]{longest['max_seq_len']:,}[/] tokens a "
                      f"row (estimated {size(longest['estimated'])}; the recipe asks {longest['recipe_max_seq_len']:,}"
                      f"{'' if longest['recipe_fits'] else ', which does not fit'})")
    else:
        console.print(f"[bold red]not even 256 tokens[/] fit {budget}")
    for option in longest["options"]:
        sets = " ".join(f"--set {item}" for item in option["set"])
        console.print(f"  {option['max_seq_len']:>9,}  {escape(option['change'])}  [dim]{escape(sets)}[/]")
    nxt = longest["next"]
    if nxt:
        console.print(f"cheapest change for longer rows: {escape(nxt['change'])} -> {nxt['max_seq_len']:,} tokens")


def print_doctor(console, report: dict) -> None:
    from rich.table import Table

    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}
    table = Table(show_edge=False, title="msov doctor", title_justify="left")
    table.add_column("check")
    table.add_column("")
    table.add_column("detail", overflow="fold")
    for check in report["checks"]:
        table.add_row(check["name"], marks[check["status"]], escape(check["detail"]))
    console.print(table)
    if report["ok"]:
        count = len(report["warnings"])
        warned = f" ({count} warning{'s' * (count != 1)})" if count else ""
        console.print(f"[bold green]ready[/]: this machine can run msov offline{warned}.")
    else:
        console.print(f"[bold red]not ready[/]: required check(s) failed: {', '.join(report['failed'])}.")


def print_converted_model(console, result: dict, native: Path) -> None:
    console.print(f"[green]converted[/] {native} -> {result['out']} "
                  f"(model.safetensors sha256 {result['written']['model.safetensors'][:16]}…)")


# --- data: validate, scan, stats, convert, show -------------------------------------------------------------------

def print_validated(console, result: dict) -> None:
    for r in result["files"]:
        roles = f", roles {'/'.join(r['roles'])}" if r["roles"] else ""
        print(f"ok  {r['path']}: format {r['format']}, {r['rows']:,} rows{roles}; fields {', '.join(r['fields'])}")


def print_scan(console, report, redacted_to: Path | None = None) -> None:
    """`report`: a data.scan report (counts by kind, masked examples)."""
    from rich.table import Table

    console.print(f"scanned {report.rows} rows in {len(report.files)} file(s)")
    if not report.counts:
        console.print("[green]no likely personal data or secrets found[/]")
    else:
        table = Table(show_edge=False)
        for column in ("kind", "count", "examples (masked)"):
            table.add_column(column)
        for kind, count in sorted(report.counts.items()):
            examples = [f"{escape(f.where())} {escape(f.masked)}" for f in report.examples if f.kind == kind]
            table.add_row(kind, str(count), "\n".join(examples))
        console.print(table)
    if redacted_to:
        console.print(f"redacted copy written to {escape(str(redacted_to))}")


def print_token_stats(console, stats: dict) -> None:
    from rich.table import Table

    table = Table(title="tokens", show_edge=False)
    for column in ("split", "rows in", "rows kept", "truncated", "dropped", "tokens", "supervised", "len min/med/max"):
        table.add_column(column, justify="right")
    for split, s in stats.items():
        if not s:
            continue
        dropped = s["dropped_overlong"] + s["dropped_unsupervised"]
        table.add_row(split, str(s["rows_in"]), str(s["rows_out"]), str(s["truncated"]), str(dropped),
                      f"{s['tokens']:,}", f"{s['supervised_tokens']:,}",
                      f"{s['min_len']}/{s['median_len']:.0f}/{s['max_len']}")
    console.print(table)


def print_converted_data(console, result: dict) -> None:
    print(f"ok  {result['source']} ({result['format']}, {result['rows']} rows) -> {result['out']} (chat)")


def print_shown_rows(console, shown) -> None:
    """`shown`: cli.data.ShownRows, each row's text as (piece, supervised) pairs."""
    for number, row in enumerate(shown.rows, 1):
        console.print(f"[bold]row {number}[/]: {row['tokens']} tokens, {row['supervised_tokens']} supervised "
                      "[green](green)[/]")
        console.print("".join(f"[green]{escape(text)}[/]" if learned else escape(text)
                              for text, learned in row["pieces"]))
        console.print(f"[dim]ids: {row['ids']}[/]")


# --- train: finetune, demo ----------------------------------------------------------------------------------------

def print_dry_run(console, report: dict, recipe) -> None:
    console.print("[bold]resolved recipe[/]")
    console.print(escape(recipe.to_yaml()))
    console.print(f"recipe digest  sha256:{report['recipe_digest']}")
    console.print(f"model          {escape(report['model']['path'])} ({report['model']['architecture']})")
    p = report["parameters"]
    console.print(f"parameters     {p['trainable']:,} trainable of {p['total']:,} ({p['trainable_pct']:.3f}%)")
    for split in ("train", "eval"):
        for f in report["data"][split]:
            console.print(f"{split:5} data     {escape(f['path'])}: {f['rows']} rows, {f['format']}")
    print_token_stats(console, report["tokens"])
    console.print("[green]dry run ok[/]: nothing was trained.")


def print_run_summary(console, record, *, wall_time_s: float | None = None) -> None:
    """`record`: the finished run's RunRecord; `wall_time_s` replaces the run's own time (the demo's, model
    build included)."""
    train, before, after = record.train, record.eval.before, record.eval.after
    console.print()
    console.print(f"[bold green]done[/]: {record.name} - {train.steps} steps")
    if train.first_loss is not None:
        console.print(f"train loss     {num(train.first_loss)} -> {num(train.final_loss)}")
    if before and after:
        drop = 100.0 * (1 - after.loss / before.loss)
        console.print(f"eval loss      {num(before.loss)} -> {num(after.loss)} ({drop:.0f}% lower)"
                      f"  perplexity {num(before.perplexity, 1)} -> {num(after.perplexity, 1)}")
    sample = record.sample
    if sample:
        question = next((m["content"] for m in reversed(sample.prompt) if m["role"] == "user"), "")
        console.print(f"[bold]sample question[/] {escape(question)}")
        console.print(f"  before: {escape(sample.before or '(empty)')}")
        console.print(f"  after:  {escape(sample.after or '(empty)')}")
        console.print(f"  reference: {escape(sample.reference or '')}")
    console.print(f"run folder     {escape(record.run_dir)}")
    console.print(f"adapter        {escape(record.adapter_dir)}  (PeftModel.from_pretrained loads it)")
    if record.loss_plot:
        console.print(f"loss plot      {escape(record.loss_plot)}")
    board = Path(record.run_dir) / "tensorboard"
    if board.is_dir():
        console.print(f"tensorboard    tensorboard --logdir {escape(str(board))}")
    console.print(f"time           {record.wall_time_s if wall_time_s is None else wall_time_s:.1f} s")


def print_demo(console, demo) -> None:
    """`demo`: cli.train.DemoResult, the run and the demo's whole wall time."""
    print_run_summary(console, demo.record, wall_time_s=demo.wall_time_s)


# --- eval: eval, generate -----------------------------------------------------------------------------------------

def print_eval(console, result: dict) -> None:
    console.print(f"{result['rows']} rows, {result['base']['tokens']} supervised tokens")
    for name in ("base", "adapter"):
        if name in result:
            console.print(f"{name:8} loss {num(result[name]['loss'])}  "
                          f"perplexity {num(result[name]['perplexity'], 2)}")


def print_answers(console, answers: dict) -> None:
    for name in ("base", "adapter"):
        if name in answers:
            console.print(f"[bold]{name}:[/] {escape(answers[name])}")


# --- audit: keygen, sign, verify, reproduce, manifest show --------------------------------------------------------

def print_keygen(console, result: dict) -> None:
    from ..trust.keys import PASSPHRASE_ENV

    if result.get("in_token"):
        console.print(f"private key  {result['private_key']}  (inside the token: sensitive, never extractable)")
        console.print(f"public key   {result['public_key'] or 'not written (pass --out KEYBASE)'}")
        console.print(f"fingerprint  SHA256:{result['key_hint']}")
        return
    encrypted = result["encrypted"]
    console.print(f"private key  {result['private_key']}  (mode 0600{', encrypted' if encrypted else ''}; keep it "
                  f"secret, outside every output folder)")
    console.print(f"public key   {result['public_key']}  (give this to auditors)")
    console.print(f"fingerprint  SHA256:{result['key_hint']}")
    if not encrypted:
        console.print(f"[dim]the private key is not encrypted; set {PASSPHRASE_ENV} or pass --passphrase-prompt "
                      f"to encrypt it[/]")


def print_approved(console, result: dict) -> None:
    approver, signer = result["approver"], result["signer"]
    console.print(f"[green]approved[/] {result['folder']}  sha256:{result['subject_digest'][:16]}…")
    console.print(f"approval     {result['approval']}")
    console.print(f"approved by  {approver.get('subject') or 'SHA256:' + approver['key_hint']}")
    console.print(f"signed by    {signer.get('subject') or signer['fingerprint']}  (checked before approving)")


def print_signed(console, result: dict, folder: Path) -> None:
    signer = result.get("signer") or {}
    console.print(f"[green]signed[/] {result['files']} files of {folder}")
    console.print(f"signature       {result['sig']}")
    console.print(f"subject digest  sha256:{result['subject_digest']}")
    if signer.get("method") == "certificate":
        console.print(f"certificate     {_safe(signer['subject'])}  (OMS certificate method)")
        console.print(f"issued by       {' → '.join(_safe(i) for i in signer['issuers'])}")
        console.print(f"valid until     {signer['not_after']}")
    console.print(f"key             SHA256:{result['key_hint']}")


def print_verified(console, report: dict, folder: Path, explain: bool) -> None:
    """`report["provenance"]`: the explained provenance (trust.provenance.explain), None when there is none.
    `report["key"]`: who signed (trust.oms._check_envelope): a key, or a certificate and its issuer chain."""
    signer = report["key"]
    certificate = signer.get("method") == "certificate"
    console.print(f"[bold green]verified[/] {len(report['files'])} files of {folder} against {report['sig']}")
    console.print(f"subject digest  sha256:{report['subject_digest']}")
    if certificate:
        console.print(f"signed by       {_safe(signer['subject'])}  (certificate issued by "
                      f"{' → '.join(_safe(i) for i in signer['issuers'])})")
    for party in report.get("parties", [])[1:]:  # --require: each approver, verified like the signer
        who = _safe(party["subject"]) if party.get("method") == "certificate" else party["fingerprint"]
        console.print(f"approved by     {who}  ({_safe(party['sig'])})")
    if signer.get("signed_at"):
        console.print(f"signed at       {signer['signed_at']}  (RFC 3161 timestamp, checked against the --tsa-ca "
                      f"root)")
    elif signer.get("timestamp"):
        console.print(f"[yellow]timestamp       {signer['timestamp']}[/]")
    if report.get("unsigned"):
        console.print(f"[yellow]{len(report['unsigned'])} files are not covered by the signature "
                      f"(--ignore-unsigned-files): {', '.join(_safe(n) for n in report['unsigned'][:5])}"
                      f"{' …' if len(report['unsigned']) > 5 else ''}[/]")
    if not explain:
        if not certificate:
            console.print(f"signer key      {signer['fingerprint']} ({signer['curve']})")
        return
    console.print()
    console.print("[bold]how it was signed[/] (OMS §4.1)")
    if certificate:
        console.print(f"method          certificate: chain validated to the --ca root {_safe(signer['path'])} at "
                      f"{signer['validated_at']}")
        console.print(f"certificate     {_safe(signer['subject'])}  {signer['certificate_fingerprint']}")
        console.print(f"issuer chain    {' → '.join(_safe(i) for i in signer['issuers'])}")
        console.print(f"valid           {signer['not_before']} → {signer['not_after']}")
    else:
        console.print(f"method          key: the public key {_safe(signer['path'])}")
    console.print(f"signer key      {signer['fingerprint']} ({signer['curve']})")
    if report["provenance"] is None:
        console.print("[yellow]no msov/provenance.json in this folder: nothing to say about its inputs[/]")
    else:
        print_explanation(console, report["provenance"])


def _safe(text: str) -> str:
    """A certificate name or path on screen: no terminal control, no rich markup (a CA may put `[` in a name)."""
    from ..trust.hashing import printable

    return escape(printable(str(text)))


def print_explanation(console, facts: dict) -> None:
    """The provenance for a person: what an auditor asks first, in the order they ask it."""
    from ..trust.hashing import printable

    def safe(text: str) -> str:  # a hostile name can neither fake a line, drive the terminal, nor inject markup
        return escape(printable(text))

    base = facts["base_model"]
    console.print()
    console.print("[bold]what went into it[/] (msov/provenance.json, covered by the signature)")
    console.print(f"base model   {safe(str(base.get('path')))}  ({base.get('architecture') or '?'}, "
                  f"{len(base['files'])} files)")
    for item in base["files"]:
        console.print(f"  {item['sha256'][:16]}  {safe(item['name'])}")
    console.print("datasets")
    for item in facts["datasets"]:
        console.print(f"  {item['sha256'][:16]}  {safe(item['path'])}  ({item.get('split')}, "
                      f"{item.get('rows')} rows, {item.get('format')})")
    console.print(f"recipe       {safe(str(facts.get('recipe_name')))}  sha256:{facts.get('recipe_digest')}  "
                  f"seed {facts.get('seed')}")
    versions = facts["versions"]
    console.print("versions     " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform"))
    hardware = facts.get("hardware") or {}
    accelerators = ", ".join(hardware.get("accelerators") or []) or "no accelerator"
    console.print(f"machine      {hardware.get('cpu') or hardware.get('machine')} × {hardware.get('cpu_count')}, "
                  f"{accelerators}; {versions.get('platform', '')}")
    console.print(f"times        {facts.get('started')} → {facts.get('finished')}")
    metrics = facts.get("metrics") or {}
    train, evaluation = metrics.get("train") or {}, metrics.get("eval") or {}
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    if train or before or after:
        console.print(f"metrics      {train.get('steps')} steps, final train loss {num(train.get('final_loss'))}; "
                      f"eval loss {num(before.get('loss'))} → {num(after.get('loss'))}")
    if compute := facts.get("compute"):
        console.print("compute      " + _compute_line(compute))
    if controls := facts.get("controls"):
        console.print("controls     " + safe(_controls_line(controls)))
    for item in facts["weights"]:
        console.print(f"weights      {item['sha256'][:16]}  {safe(item['name'])}")
    export = facts.get("export")
    seal = (export or {}).get("training_seal")
    if export is None:
        console.print("sealed at training time: everything above (the training run wrote this provenance)")
    elif seal:
        signer = (f"signed at training time by key SHA256:{seal['training_key_hint']}" if seal["signed_at_training"]
                  else "NOT signed at training time: someone able to rewrite the run folder could have rewritten "
                       "its record too")
        console.print(f"sealed at training time: base model, datasets, recipe, seed, versions, machine, metrics "
                      f"(the run's {seal['record']}, sha256:{seal['record_sha256'][:16]}…; {signer})")
        console.print("sealed at export time: the weights, how they were merged (dtype, base digest)")
    else:
        console.print("sealed at export time: everything above (a bare adapter: no training record existed)")


def _compute_line(compute: dict) -> str:
    line = f"{compute.get('flops', 0):.3g} FLOPs over {compute.get('tokens_processed')} tokens"
    threshold = compute.get("threshold") or 1 / 3
    if compute.get("ratio") is None:
        return line + f"; base model's pre-training compute not declared (the 1/3 threshold: {threshold:.3g})"
    verdict = "ABOVE" if compute.get("above_threshold") else "below"
    return (line + f" = {compute['ratio']:.3g} × the base's {compute.get('base_training_flops'):.3g}; {verdict} the "
            f"1/3 threshold of the EU's 2025 GPAI guidelines")


def _controls_line(controls: dict) -> str:
    egress = controls.get("egress_guard") or {}
    if egress.get("active"):
        refused = egress.get("refused", 0)
        where = ", ".join(egress.get("refused_destinations") or [])
        guard = f"egress guard on, refused {refused}" + (f" ({where})" if where else "")
    else:
        guard = "egress guard NOT active"
    env = controls.get("offline_env") or {}
    offline = "HF_HUB_OFFLINE=" + str(env.get("HF_HUB_OFFLINE")) + f" (+{max(len(env) - 1, 0)} more)"
    scan = controls.get("scan") or {}
    found = sum((scan.get("counts") or {}).values())
    policy = (f"scan {scan.get('action', 'warn')}, fail-on {','.join(scan.get('fail_on') or []) or 'none'}, "
              f"redact {'yes' if scan.get('redact') else 'no'}, {found} findings")
    return f"{guard}; offline env {offline}; {policy}; seed {controls.get('seed')}"


def print_reproduced(console, report: dict) -> None:
    if report["status"] == "identical":
        console.print("[bold green]reproduced[/]: the re-run's weights are byte-identical to the signed ones")
    else:
        loss = report["eval_loss"]
        console.print("[bold yellow]equivalent[/]: not byte-identical (" + "; ".join(report["reasons"])
                      + f"); eval loss {num(loss['recorded'])} -> {num(loss['reproduced'])}")
    for name, digest in report["reproduced"].items():
        console.print(f"  {name}  sha256:{digest}")
    if report.get("result_file"):
        console.print(f"recorded in {escape(report['result_file'])}")


def print_manifest(console, described: dict, folder: Path) -> None:
    """One line per file, digest first (as sha256sum prints it), full digests: an auditor compares them by eye or
    by grep, so nothing is truncated to fit a table."""
    from ..trust.hashing import printable

    console.print(f"{folder}: {len(described['files'])} files, {size(described['total_bytes'])}", markup=False)
    for item in described["files"]:
        console.print(f"{item['digest']}  {size(item['size']):>10}  {printable(item['name'])}", markup=False)
    console.print(f"subject digest  sha256:{described['subject_digest']}  (ignoring "
                  f"{', '.join(described['ignore_paths'])})")


# --- export: export, registry list --------------------------------------------------------------------------------

def print_export(console, result: dict) -> None:
    where = result.get("out") or result.get("path")
    if result.get("kind") == "merged":
        console.print(f"[green]merged[/] {result['merged_tensors']} LoRA targets into {len(result['files'])} "
                      f"weight file(s), {size(result['total_size'])} ({result['dtype']}) in "
                      f"{result['wall_time_s']} s", markup=True)
        console.print(f"folder          {where}", markup=False)
        console.print(f"merged into     {result['merged_into']}", markup=False)
    else:
        verb = "already published, identical" if result["status"] == "unchanged" else "published"
        label = f"{result['name']} {result['version']}" if result.get("version") else result["name"]
        console.print(f"[green]{verb}[/] {label}")
        console.print(f"folder          {where}", markup=False)
    console.print(f"adapter id      sha256:{result['adapter_id']}", markup=False)
    if result.get("sig"):
        console.print(f"signature       {result['sig']}  (key SHA256:{result.get('key_hint')})", markup=False)
    else:
        console.print("signature       none (pass --key KEY.pem to sign)", markup=False)


def print_registry(console, listing: dict) -> None:
    """Plain columns rather than a rich table: a narrow terminal or a CI log must not wrap digests mid-word."""
    entries = listing["adapters"]
    if not entries:
        print(f"{listing['registry']}: no adapters yet")
        return
    rows = [("name", "version", "digest", "base model", "date", "signed by", "approved by", "status")]
    rows += [(e["name"], e["version"], _short(e["digest"]), _short(e["base_model_digest"]), (e["date"] or "-")[:10],
              _party(e["signed_by"]), ", ".join(map(_party, e.get("approved_by") or [])) or "-", e["status"])
             for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _party(who: str | None) -> str:
    """A key as SHA256:<12 hex>, a certificate by its subject's common name (the listing is one line per entry)."""
    from ..trust.hashing import printable

    if not who:
        return "-"
    if who.startswith("SHA256:"):
        return who[:19]
    return printable(next((part[3:] for part in who.split(",") if part.startswith("CN=")), who))


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"
