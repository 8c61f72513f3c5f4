"""`msov data scan`: personal data and secrets found, masked, counted, redacted; and recorded by finetune."""

import json

from mistral_sov.data.scan import find_spans, redact, scan_files

ROWS = [
    {"instruction": "Mail bob.smith@corp.example.com, card 4111 1111 1111 1111", "output": "Call +44 20 7946 0958"},
    {"instruction": "IBAN GB82 WEST 1234 5698 7654 32 from 10.2.3.4", "output": "key AKIAIOSFODNN7EXAMPLE"},
    {"instruction": "ssn 123-45-6789", "output": "-----BEGIN RSA PRIVATE KEY----- MIIE"},
    {"instruction": "ticket NS-16340 on 2024-01-15 at 127.0.0.1, card 4111 1111 1111 1112", "output": "ok"},
]


def write(tmp_path, rows=ROWS):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_kind_found_once_and_masked(tmp_path):
    report = scan_files([write(tmp_path)])
    assert dict(report.counts) == {"email": 1, "credit_card": 1, "phone": 1, "iban": 1, "ip_address": 1,
                                   "api_key": 1, "national_id": 1, "private_key": 1}
    email = next(f for f in report.examples if f.kind == "email")
    assert email.where().endswith("d.jsonl:1") and "bob.smith" not in email.masked
    assert report.summary()["counts"]["email"] == 1 and "examples" not in report.summary()


def test_no_false_positives_on_tickets_dates_loopback_and_bad_luhn():
    assert find_spans(ROWS[3]["instruction"]) == []


def test_redact_replaces_every_finding():
    text = ROWS[0]["instruction"]
    assert redact(text) == "Mail [REDACTED:EMAIL], card [REDACTED:CREDIT_CARD]"


def test_cli_scan_fail_on_and_redact(cli, tmp_path):
    path = write(tmp_path)
    ok = cli("data", "scan", path, "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["counts"]["phone"] == 1
    failed = cli("data", "scan", path, "--fail-on", "email,iban")
    assert failed.exit_code == 3 and "1 email, 1 iban" in failed.stderr
    assert cli("data", "scan", path, "--fail-on", "emails").exit_code == 2
    out = tmp_path / "clean.jsonl"
    redacted = cli("data", "scan", path, "--redact", out, "--fail-on", "any")
    assert redacted.exit_code == 3  # the input still has them; the copy does not
    assert scan_files([out]).counts == {}
    assert "[REDACTED:EMAIL]" in out.read_text()


def test_sample_data_is_clean(cli):
    from conftest import SAMPLES

    files = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".parquet"))
    result = cli("data", "scan", *files, "--json", "--fail-on", "any")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] > 800


def test_one_megabyte_string_scans_in_linear_time(tmp_path):
    # Before: the email pattern rescanned a long run from every start position (10k chars 0.3 s, 1 MB hours).
    import time

    row = {"text": "a" * 400_000 + "1." * 150_000 + "eyJ-" * 25_000 + "mail bob@corp.example.com ok " * 100}
    start = time.perf_counter()
    report = scan_files([write(tmp_path, [row])])
    assert time.perf_counter() - start < 20
    assert report.counts == {"email": 100}


def test_labelled_corpus_found_and_no_false_positives():
    # Before: none of the phones, IPv6, PGP, ASIA/AWS secret/github_pat/sk_live/short-JWT or lowercase IBAN rows were
    # found, and `15.01.2024 10` and `8080 8081 8082` were reported as phones.
    from pathlib import Path

    corpus = Path(__file__).parent / "scan_corpus" / "corpus.jsonl"
    for line in corpus.read_text().splitlines():
        row = json.loads(line)
        assert [kind for _, _, kind in find_spans(row["text"])] == row["kinds"], row["text"]


def test_redact_csv_with_bom_and_spaced_header(cli, tmp_path):
    # Before: the header was re-read with its BOM and spaces, so the rows' keys did not match it (exit 1).
    path = tmp_path / "d.csv"
    path.write_text("\ufeffinstruction , output\nmail bob@corp.example.com,ok\n", encoding="utf-8")
    out = tmp_path / "clean.csv"
    result = cli("data", "scan", path, "--redact", out)
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").splitlines() == ["instruction,output", "mail [REDACTED:EMAIL],ok"]


def test_redact_two_inputs_with_one_name_refused(cli, tmp_path):
    # Before: both were redacted to OUT/d.jsonl, the second overwriting the first.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = write(tmp_path / "a"), write(tmp_path / "b")
    result = cli("data", "scan", first, second, "--redact", tmp_path / "out")
    assert result.exit_code == 3 and str(first) in result.stderr and str(second) in result.stderr
    assert not (tmp_path / "out").exists()
