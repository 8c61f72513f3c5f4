"""The report page: one HTML file built from `facts.gather`'s dict, readable offline and on paper.

Self-contained on purpose: the CSS is inline, the loss plot a data: URI, and there is no script at all, so opening
the file cannot reach anything (the Content-Security-Policy says so to the browser as well). Every value from the
folder, its provenance or a certificate is escaped: a dataset path or a certificate name may be hostile markup.
"""

from __future__ import annotations

import html
import json

from ..trust.hashing import printable

NOT_RECORDED = "not recorded by this msov version"
SECTIONS = ("verdict", "chain", "data", "training", "evaluation", "environment", "controls", "compute", "annex-iv",
            "limits")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
GPAI_FLOPS = 1e23  # the Commission's guidelines: the indicative training compute of a general-purpose AI model

CSS = """
:root { --ok: #1a7f37; --bad: #b42318; --warn: #9a6700; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1100px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; border-bottom: 2px solid var(--line);
  padding-bottom: 4px; margin-top: 32px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.meta, .note { color: var(--muted); font-size: 12px; }
code, .digest { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px;
  overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; } td { overflow-wrap: anywhere; }
.verdict { border: 3px solid; border-radius: 8px; padding: 12px 16px; margin: 16px 0; }
.verdict.ok { border-color: var(--ok); background: #dafbe1; } .verdict.bad { border-color: var(--bad);
  background: #ffebe9; }
.verdict .headline { font-size: 20px; font-weight: 700; }
.verdict.ok .headline { color: var(--ok); } .verdict.bad .headline { color: var(--bad); }
.tag { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 10px; border: 1px solid; }
.tag.signed { color: var(--ok); } .tag.unsigned { color: var(--warn); } .tag.bad { color: var(--bad); }
.chain { display: flex; flex-wrap: wrap; gap: 6px; align-items: stretch; margin: 8px 0; }
.chain .step { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; flex: 1 1 150px; }
.chain .arrow { align-self: center; color: var(--muted); }
.missing { color: var(--muted); font-style: italic; }
td a { white-space: nowrap; }
img.plot { max-width: 100%; border: 1px solid var(--line); }
ul.limits li { margin: 4px 0; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  section { break-before: page; } section#verdict { break-before: auto; }
  table, .verdict, .chain .step, img.plot { break-inside: avoid; } tr { break-inside: avoid; }
  .verdict, th, .tag { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  a { color: inherit; text-decoration: none; }
}
@page { size: A4; margin: 16mm 14mm; }
"""


def e(value) -> str:
    """Any value as safe HTML text: control characters made visible, markup escaped (quotes too)."""
    if value is None:
        return f'<span class="missing">{NOT_RECORDED}</span>'
    return html.escape(printable(str(value)), quote=True)


def code(value) -> str:
    return f"<code>{e(value)}</code>" if value is not None else e(None)


def fmt(value, digits: int = 4) -> str | None:
    """A number as plain text (thousands separated, floats rounded), None when it was not recorded."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) >= 1e6 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"


def num(value, digits: int = 4) -> str:
    return e(fmt(value, digits))


def rows(pairs) -> str:
    """A two-column table of (label, already-escaped HTML) pairs."""
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def table(head: list[str], body: list[list[str]]) -> str:
    """Cells are already-escaped HTML."""
    if not body:
        return '<p class="missing">none recorded</p>'
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body) + "</table>")


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{e(title)}</h2>\n{body}\n</section>\n'


def render(facts: dict) -> str:
    """The whole page as one string."""
    p = facts.get("provenance") or {}
    body = "".join([
        _verdict(facts), _chain(facts, p), _data(facts, p), _training(facts, p), _evaluation(facts, p),
        _environment(facts, p), _controls(facts, p), _compute(p), _annex(facts, p), _limits(facts),
    ])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>msov report: {e(facts['folder'])}</title>\n<style>{CSS}</style></head>\n<body>\n"
        f"<header><h1>Audit dossier: {e(facts['folder'])}</h1>"
        f'<p class="meta">made by msov {e(facts["generator"]["msov"])} (Python {e(facts["generator"]["python"])}) '
        f"at {e(facts['generated_at'])}, offline, from the folder, its signature and the files beside it. Sections: "
        + " · ".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS) + "</p></header>\n"
        + body + "</body></html>\n")


# --- sections ------------------------------------------------------------------------------------------------------

def _verdict(facts: dict) -> str:
    v = facts["verdict"]
    if not v["ok"]:
        box = (f'<div class="verdict bad"><div class="headline">NOT INTACT: verification failed</div>'
               f"<p><strong>{e(v['error'])}</strong></p>"
               + (f'<p class="note">{e(v["hint"])}</p>' if v.get("hint") else "")
               + f"<p>signature: {code(v.get('sig'))}. Nothing below is established by a signature: what follows "
               f"is what the folder claims.</p>"
               + (f"<p>approvals beside the folder (not checked): {', '.join(code(a) for a in v['claimed_approvals'])}"
                  f"</p>" if v.get("claimed_approvals") else "")
               + "</div>")
        return section("verdict", "Verdict", box + _reproduced(facts))
    signer = v["signer"]
    if signer.get("method") == "certificate":
        who = (f"certificate {e(signer.get('subject'))}, issued by "
               f"{' → '.join(e(i) for i in signer.get('issuers') or [])}; chain validated to the root you gave "
               f"({code(signer.get('path'))})")
    else:
        who = (f"key {code(signer.get('fingerprint'))} ({e(signer.get('curve'))}), the public key "
               f"{code(signer.get('path'))}")
    approvals = [f"{_party(a)} <span class=\"tag signed\">verified</span> ({code(a.get('sig'))})"
                 for a in v.get("approvals") or []]
    approvals += [f"{e(a)} <span class=\"tag unsigned\">claimed, not checked: pass --require</span>"
                  for a in v.get("claimed_approvals") or []]
    ts = v["timestamp"]
    stamp = (f"{e(ts['time'])} <span class=\"tag signed\">RFC 3161, verified against the --tsa-ca root</span>"
             if ts["status"] == "verified" else e(ts["status"]) +
             ' <span class="note">(times below are then the trainer\'s own clock)</span>')
    box = ('<div class="verdict ok"><div class="headline">INTACT: every file matches its signature</div>'
           + rows([("files", f"{len(v['files'])} signed files, none changed, added or removed"
                    + (f"; {len(v['unsigned'])} unsigned files present (ignored on request)" if v["unsigned"] else "")),
                   ("subject digest", code("sha256:" + v["subject_digest"])),
                   ("signed by", who),
                   ("approvals", "<br>".join(approvals) or "none"),
                   ("required parties", ", ".join(code(r) for r in v.get("required") or []) or "none asked for"),
                   ("timestamp", stamp),
                   ("signature file", code(v["sig"]))])
           + "</div>")
    files = table(["file", "sha256", "bytes"], [[code(f["name"]), f'<span class="digest">{e(f["digest"])}</span>',
                                                num(f["size"])] for f in v["files"]])
    return section("verdict", "Verdict", box + _reproduced(facts) + "<h3>Signed files</h3>" + files)


def _party(party: dict) -> str:
    return e(party.get("subject")) if party.get("method") == "certificate" else code(party.get("fingerprint"))


def _reproduced(facts: dict) -> str:
    r = facts.get("reproduced")
    if r is None:
        return f"<p>reproduction: no {code('FOLDER.reproduced.json')} beside the folder (run " \
               f"{code('msov reproduce')} to re-train and compare)</p>"
    if r.get("error"):
        return f"<p>reproduction: {code(r['path'])} {e(r['error'])}</p>"
    match = {True: "refers to the digest verified above", False: "refers to OTHER content than the folder verified "
             "above", None: "cannot be matched to a verified digest"}[r["matches_verified"]]
    return (f"<p>reproduction: <strong>{e(r['status'])}</strong> at {e(r['checked_at'])} "
            f"(expected {code(r['expected_digest'])}, got {code(r['got_digest'])}); {match}. "
            f'<span class="tag unsigned">not covered by the signature</span> {code(r["path"])}</p>')


def _chain(facts: dict, p: dict) -> str:
    base = p.get("base_model") or {}
    steps = [
        ("base model", f"{code(base.get('path'))}<br>{e(base.get('architecture'))}<br>{len(base.get('files') or [])}"
                       " files hashed"),
        ("data", "<br>".join(f"{e(d.get('split'))}: {code(_name(d.get('path')))}" for d in p.get("datasets") or [])
                 or e(None)),
        ("recipe", f"{e(p.get('recipe_name'))}<br>{code(_short(p.get('recipe_digest')))}"),
        ("run", f"seed {e(p.get('seed'))}<br>{e(p.get('started'))}<br>→ {e(p.get('finished'))}"),
        ("export", e(_export_kind(p)) if p else e(None)),
    ]
    flow = '<div class="chain">' + '<span class="arrow">→</span>'.join(
        f'<div class="step"><strong>{e(t)}</strong><br>{b}</div>' for t, b in steps) + "</div>"
    digests = table(["link", "item", "sha256"],
                    [["base model", code(f["name"]), _digest(f["sha256"])] for f in base.get("files") or []]
                    + [["data", code(d.get("path")), _digest(d.get("sha256"))] for d in p.get("datasets") or []]
                    + [["recipe", e(p.get("recipe_name")), _digest(p.get("recipe_digest"))]]
                    + [["weights (run output)", code(w["name"]), _digest(w["sha256"])] for w in p.get("weights") or []])
    export = p.get("export")
    export_html = ("<h3>Export</h3>" + rows([(k, code(json.dumps(v, sort_keys=True)) if isinstance(v, (dict, list))
                                              else e(v)) for k, v in export.items()])) if export else \
        '<p class="note">export: none; this folder is the training run\'s own output (sealed at training time).</p>'
    note = _provenance_note(facts)
    return section("chain", "Provenance chain (base → data → recipe → run → export)",
                   note + flow + digests + export_html)


def _provenance_note(facts: dict) -> str:
    if facts.get("provenance_verified"):
        return ('<p class="note">From <code>msov/provenance.json</code> (in-toto / SLSA provenance), '
                '<span class="tag signed">covered by the signature</span>.</p>')
    return f'<p><span class="tag bad">{e(facts.get("provenance_note") or "no provenance")}</span></p>'


def _export_kind(p: dict) -> str:
    export = p.get("export")
    if not export:
        return "none: the run's own adapter"
    return str(export.get("kind") or export.get("format") or "exported")


def _data(facts: dict, p: dict) -> str:
    datasets = table(["split", "file", "format", "rows", "sha256"],
                     [[e(d.get("split")), code(d.get("path")), e(d.get("format")), num(d.get("rows")),
                       _digest(d.get("sha256"))] for d in p.get("datasets") or []])
    scan = facts.get("data_scan")
    controls_scan = (p.get("controls") or {}).get("scan") if isinstance(p.get("controls"), dict) else None
    if scan is None and controls_scan is None:
        scan_html = f"<p>personal-data and secrets scan: {e(None)}</p>"
    else:
        scan = {**(scan or {}), **{k: v for k, v in (controls_scan or {}).items() if k in ("files", "rows")}}
        counts = (controls_scan or {}).get("counts") or scan.get("counts") or {}
        scan_html = rows([
            ("files scanned", num(scan.get("files"))), ("rows scanned", num(scan.get("rows"))),
            ("findings by kind", ", ".join(f"{e(k)}: {num(n)}" for k, n in sorted(counts.items())) or
             "none found (a pattern scan finding nothing is not proof that there is nothing)"),
            ("fail on", _value((controls_scan or {}).get("fail_on")) if controls_scan else e(None)),
            ("on findings", _value((controls_scan or {}).get("action")) if controls_scan else e(None)),
            ("redacted", _value((controls_scan or {}).get("redact")) if controls_scan else e(None)),
        ])
    tokens = ((p.get("metrics") or {}).get("tokens")) or {}
    token_table = table(["split", "rows in", "rows out", "tokens", "supervised", "truncated", "dropped (overlong)"],
                        [[e(s), num(t.get("rows_in")), num(t.get("rows_out")), num(t.get("tokens")),
                          num(t.get("supervised_tokens")), num(t.get("truncated")), num(t.get("dropped_overlong"))]
                         for s, t in sorted(tokens.items()) if isinstance(t, dict)])
    return section("data", "Data and scan", _provenance_note(facts) + datasets
                   + "<h3>Personal data and secrets scan</h3>" + scan_html + "<h3>Tokenisation</h3>" + token_table)


def _training(facts: dict, p: dict) -> str:
    recipe = facts.get("recipe") or {}
    lora, train = recipe.get("lora") or {}, recipe.get("train") or {}
    quant = recipe.get("quantization")
    settings = rows([
        ("method", "LoRA adapter on a frozen base model" + (f", quantized ({e(json.dumps(quant))})" if quant else "")),
        ("LoRA", f"r {e(lora.get('r'))}, alpha {e(lora.get('alpha'))}, dropout {e(lora.get('dropout'))}; targets "
                 f"{e(', '.join(lora.get('target_modules') or []) or None)}") if lora else ("LoRA", e(None)),
        ("optimisation", f"{e(train.get('optimizer'))}, lr {e(train.get('lr'))} ({e(train.get('scheduler'))}), "
                         f"batch {e(train.get('batch_size'))} × grad accum {e(train.get('grad_accum'))}, "
                         f"max steps {e(train.get('max_steps'))}, epochs {e(train.get('epochs'))}") if train
        else ("optimisation", e(None)),
        ("loss on", e((recipe.get("data") or {}).get("train_on"))),
        ("seed", e(p.get("seed"))),
    ])
    m = (p.get("metrics") or {}).get("train") or {}
    run = rows([("steps", num(m.get("steps"))), ("first / final train loss",
                                                   f"{num(m.get('first_loss'))} → {num(m.get('final_loss'))}"),
                ("tokens seen", num(m.get("tokens_seen"))), ("runtime", f"{num(m.get('runtime_s'))} s"),
                ("processes", num(m.get("processes"))),
                ("resumed from step", e(m.get("resumed_from_step") or ("no" if m else None)))])
    plot = facts.get("loss_plot")
    if plot is None:
        plot_html = '<p class="missing">no loss.png beside the folder (it lives in the run folder, by run.json)</p>'
    elif plot.get("error"):
        plot_html = f"<p>{code(plot['path'])}: {e(plot['error'])}</p>"
    else:
        plot_html = (f'<figure><img class="plot" alt="training and held-out loss against step" '
                     f'src="{plot["data_uri"]}"><figcaption class="note">{code(plot["path"])} '
                     f'<span class="tag unsigned">not covered by the signature</span>: drawn by the run beside '
                     f"run.json; the numbers above, from the signed provenance, are the record.</figcaption></figure>")
    return section("training", "Training", settings + run + "<h3>Loss</h3>" + plot_html)


def _evaluation(facts: dict, p: dict) -> str:
    ev = (p.get("metrics") or {}).get("eval") or {}
    before, after = ev.get("before") or {}, ev.get("after") or {}
    if not before and not after:
        return section("evaluation", "Evaluation before / after", f"<p>{e(None)}</p>")
    held_out = [d for d in p.get("datasets") or [] if d.get("split") == "eval"]
    body = table(["measure", "before training", "after training"],
                 [["held-out loss", num(before.get("loss")), num(after.get("loss"))],
                  ["perplexity", num(before.get("perplexity"), 2), num(after.get("perplexity"), 2)],
                  ["tokens scored", num(before.get("tokens")), num(after.get("tokens"))]])
    data = ", ".join(f"{code(d.get('path'))} ({_short(d.get('sha256'))})" for d in held_out) or e(None)
    return section("evaluation", "Evaluation before / after",
                   _provenance_note(facts) + body + f"<p>held-out data: {data}. Loss and perplexity on held-out text "
                   "measure fit to that text, not task accuracy, robustness or fairness.</p>")


def _environment(facts: dict, p: dict) -> str:
    versions = p.get("versions") or {}
    hw = p.get("hardware")
    body = table(["component", "version"], [[e(k), code(v)] for k, v in sorted(versions.items())])
    body += "<h3>Machine</h3>" + (rows([(k, e(v)) for k, v in sorted(hw.items())]) if isinstance(hw, dict)
                                  else f"<p>{e(None)}</p>")
    bom = facts.get("bom")
    if bom is None:
        body += f"<h3>ML-BOM (CycloneDX)</h3><p>bom.cdx.json: {e(None)}</p>"
    elif bom.get("error"):
        body += f"<h3>ML-BOM (CycloneDX)</h3><p>{code(bom['name'])}: {e(bom['error'])}</p>"
    else:
        tag = '<span class="tag signed">signed</span>' if bom["signed"] else \
            '<span class="tag bad">not established by a signature</span>'
        body += (f"<h3>ML-BOM (CycloneDX {e(bom.get('spec_version'))})</h3><p>{code(bom['name'])} {tag}</p>"
                 + table(["type", "name", "version"], [[e(c["type"]), code(c["name"]), e(c["version"])]
                                                       for c in bom["components"]]))
    return section("environment", "Environment and versions", body)


def _controls(facts: dict, p: dict) -> str:
    controls = p.get("controls")
    if not isinstance(controls, dict):
        return section("controls", "Controls evidence", f"<p>controls (egress guard, offline environment, scan "
                       f"policy): {e(None)}.</p>" + _signature_control(facts))
    pairs = []
    for name, value in controls.items():
        if isinstance(value, dict):
            pairs.append((name.replace("_", " "), "<br>".join(f"{e(k)}: {_value(v)}" for k, v in value.items())
                          or "—"))
        else:
            pairs.append((name.replace("_", " "), _value(value)))
    return section("controls", "Controls evidence", _provenance_note(facts) + rows(pairs) + _signature_control(facts))


def _signature_control(facts: dict) -> str:
    v = facts["verdict"]
    state = "verified" if v["ok"] else "FAILED"
    return f"<p>signature over every file of the folder (OpenSSF Model Signing bundle): <strong>{state}</strong>.</p>"


def _compute(p: dict) -> str:
    c = p.get("compute")
    if not isinstance(c, dict):
        return section("compute", "Compute", f"<p>training compute (FLOPs): {e(None)}.</p>")
    body = rows([("training FLOPs (estimate)", num(c.get("flops"))), ("formula", code(c.get("formula"))),
                 ("tokens processed", num(c.get("tokens_processed"))),
                 ("parameters (total / trainable)", f"{num(c.get('total_parameters'))} / "
                                                    f"{num(c.get('trainable_parameters'))}"),
                 ("base model's training FLOPs", _known(c.get("base_training_flops"))),
                 ("ratio to the base's training compute", _known(c.get("ratio"))),
                 ("threshold", num(c.get("threshold"))),
                 ("above threshold", _known(c.get("above_threshold")))])
    return section("compute", "Compute", body + f"<p>{_gpai_sentence(p)}</p>")


def _gpai(p: dict) -> tuple[bool | None, bool | None]:
    """(is the base a general-purpose AI model, does this modification cross the threshold); None: unknown."""
    c = p.get("compute") if isinstance(p.get("compute"), dict) else {}
    base = c.get("base_training_flops")
    base_gpai = base >= GPAI_FLOPS if isinstance(base, (int, float)) else None
    above = c.get("above_threshold") if isinstance(c.get("above_threshold"), bool) else None
    return base_gpai, above


def _gpai_sentence(p: dict) -> str:
    base_gpai, above = _gpai(p)
    c = p.get("compute") if isinstance(p.get("compute"), dict) else None
    if c is None:
        return (f"Whether the base is a general-purpose AI model, and what share of its training compute this "
                f"fine-tune used: {NOT_RECORDED}. The Annex XI rows are shown for the case that it is.")
    if base_gpai is None:
        base = (f"The base model's training compute: {NOT_RECORDED}; whether the base is a general-purpose AI model "
                "is not established here.")
    else:
        base = (f"The base model's recorded training compute is {_txt(c.get('base_training_flops'))} FLOP, "
                + ("at or above 10^23 (the indicative criterion of the Commission's guidelines): a general-purpose "
                   "AI model." if base_gpai else "below 10^23."))
    if above is True:
        share = (f" This fine-tune used {_txt(c.get('ratio'))} of it, above the threshold {_txt(c.get('threshold'))}: "
                 "whoever made this modification is presumed the provider of the modified general-purpose model, "
                 "and Annex XI applies to the modification.")
    elif above is False:
        share = (f" This fine-tune used {_txt(c.get('ratio'))} of it, below the threshold {_txt(c.get('threshold'))}: "
                 "the Annex XI documentation stays with the base's provider; the rows below say what this run adds.")
    else:
        share = " The share of the base's compute this fine-tune used: not established."
    return e(base + share)


def _annex(facts: dict, p: dict) -> str:
    have = lambda value, where: f'<a href="#{where}">{where}</a>' if value else \
        '<span class="missing">not recorded</span>'  # noqa: E731 - a one-line helper
    recipe, compute, controls = facts.get("recipe"), p.get("compute"), p.get("controls")
    datasets, metrics = p.get("datasets"), (p.get("metrics") or {}).get("eval")
    iv = [
        ("1(c)", "the versions of relevant software or firmware", "library and Python versions of the run",
         have(p.get("versions"), "environment")),
        ("1(e)", "the description of the hardware on which the AI system is intended to run",
         "partly: the machine it was trained on, not the one it is intended to run on", have(p.get("hardware"),
                                                                                              "environment")),
        ("2(a)", "the methods and steps performed for the development, including recourse to pre-trained systems "
                 "provided by third parties and how those were used, integrated or modified",
         "the base model (a third party's pre-trained model) with its file digests, LoRA fine-tuning, the chain",
         have(p.get("base_model"), "chain")),
        ("2(b)", "the design specifications: general logic, key design choices, what the system is designed to "
                 "optimise for", "partly: the recipe (LoRA settings, objective, optimiser); the rationale and "
                                 "assumptions are not in the folder", have(recipe, "training")),
        ("2(c)", "the system architecture; the computational resources used to develop, train, test and validate",
         "base architecture, machine, runtime, training FLOPs", have(compute or p.get("hardware"), "compute")),
        ("2(d)", "the data requirements in terms of datasheets: training methodologies and data sets, their "
                 "provenance, scope and main characteristics, how obtained and selected, labelling, cleaning",
         "partly: data files with digests, rows, formats, split, personal-data scan and redaction; how the data was "
         "obtained, selected and labelled is not recorded", have(datasets, "data")),
        ("2(e)", "assessment of the human oversight measures needed (Article 14)",
         "not covered: the approvals here are a release sign-off, not the deployed system's oversight measures",
         '<span class="missing">outside this report</span>'),
        ("2(g)", "the validation and testing procedures, data and metrics; test logs and reports dated and signed "
                 "by the responsible persons", "held-out loss and perplexity before/after on a hashed eval set; "
                                               "the signature, approvals and timestamp date and sign this record",
         have(metrics, "evaluation")),
        ("2(h)", "cybersecurity measures put in place", "signature over every file, egress guard, offline "
                                                        "environment, secrets scan", have(controls, "controls")),
        ("3", "detailed information about the monitoring, functioning and control of the AI system",
         "partly: measured limitations and what this report cannot establish", have(True, "limits")),
        ("—", "the risk-management system (Article 9), post-market monitoring, declaration of conformity, harmonised "
              "standards applied", "not covered: organisational documents, not in the folder",
         '<span class="missing">outside this report</span>'),
    ]
    xi = [
        ("Section 1, 1(d)", "the architecture and number of parameters",
         "base architecture; total and trainable parameters", have(p.get("base_model"), "chain")),
        ("Section 1, 1(e)", "the modality and format of inputs and outputs", "partly: the training data's format "
                                                                             "(text, chat)", have(datasets, "data")),
        ("Section 1, 2(b)", "the design specifications of the model and training process, training methodologies "
                            "and techniques, key design choices", "the recipe", have(recipe, "training")),
        ("Section 1, 2(c)", "information on the data used for training, testing and validation: type, provenance, "
                            "curation, number of data points", "data files, digests, rows, scan",
         have(datasets, "data")),
        ("Section 1, 2(d)", "the computational resources used to train the model (e.g. floating point operations), "
                            "training time", "training FLOPs and runtime", have(compute, "compute")),
        ("Section 1, 2(e)", "known or estimated energy consumption", "not recorded",
         '<span class="missing">not recorded</span>'),
        ("Section 2", "(systemic risk only) evaluation strategies; adversarial testing; model adaptations, "
                      "including alignment and fine-tuning", "partly: this fine-tune is a model adaptation; no "
                                                             "adversarial testing is recorded",
         have(metrics, "evaluation")),
    ]
    body = ('<p class="note">Points as numbered in Annex IV and Annex XI of Regulation (EU) 2024/1689 (OJ L, '
            "12.7.2024); a point this report does not number is named by its words. Annex IV applies to high-risk "
            "AI systems; this folder is a component of one, and the rows say which facts a provider can take from "
            "it.</p>")
    body += "<h3>Annex IV (technical documentation, Article 11(1))</h3>" + table(
        ["point", "what it asks for", "what this folder gives", "where"],
        [[e(a), e(b), e(c), d] for a, b, c, d in iv])
    base_gpai, above = _gpai(p)
    applies = ("applies" if above or base_gpai else "for reference: not established that it applies"
               if base_gpai is None and above is None else "for reference")
    body += (f"<h3>Annex XI (general-purpose AI models, Article 53(1)(a)): {e(applies)}</h3><p>{_gpai_sentence(p)}</p>"
             + table(["point", "what it asks for", "what this folder gives", "where"],
                     [[e(a), e(b), e(c), d] for a, b, c, d in xi]))
    return section("annex-iv", "EU AI Act: Annex IV (and Annex XI) mapping", body)


def _limits(facts: dict) -> str:
    items = [
        "That the training data was lawfully obtained, may be used for training (consent, licence, copyright), or "
        "is of adequate quality, representative or free of bias. The report gives the files' digests, row counts "
        "and a pattern scan; a scan that finds nothing is not proof that there is no personal data.",
        "That the base weights are what their publisher released. Their digests were recorded at training time; "
        "compare them with digests the publisher itself publishes.",
        "That the facts in the provenance are true. A signature proves who signed and that nothing changed since; "
        "the statements are the trainer's. Re-training (`msov reproduce`) is what tests them.",
        "That the signing key or certificate belongs to the person or organisation you think: the report checks "
        "against the public key or CA root you gave it.",
        "When anything happened, unless a timestamp was verified: without one, times are the training machine's "
        "clock.",
        "Anything outside the signature: loss.png, run.json, FOLDER.reproduced.json and this report itself (unless "
        "it was signed as its own folder, see `msov report --sign-key`).",
        "Fitness for an intended purpose, task accuracy, robustness, fairness or safety: held-out loss measures fit "
        "to held-out text only. Human oversight, risk management and post-market monitoring are organisational and "
        "not in the folder.",
    ]
    if not facts["verdict"]["ok"]:
        items.insert(0, "Anything at all about this folder: it failed verification, so every fact shown is a claim.")
    return section("limits", "What this report cannot establish",
                   '<ul class="limits">' + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>")


# --- small formatters ----------------------------------------------------------------------------------------------

def _known(value) -> str:
    """A compute field this msov records but could not know (the base's publisher did not say)."""
    return '<span class="missing">unknown: not stated for the base model</span>' if value is None else _value(value)


def _value(value) -> str:
    """A recorded setting as HTML: lists joined, booleans as yes/no, mappings as compact JSON."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(e(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return code(json.dumps(value, sort_keys=True)) if value else "none"
    return num(value) if isinstance(value, (int, float)) else e(value)


def _txt(value) -> str:
    return fmt(value) or NOT_RECORDED


def _digest(value) -> str:
    return f'<span class="digest">{e(value)}</span>' if value else e(None)


def _short(digest) -> str | None:
    return f"{digest[:16]}…" if isinstance(digest, str) else None


def _name(path) -> str | None:
    return str(path).rsplit("/", 1)[-1] if path else None
