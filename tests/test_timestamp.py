"""RFC 3161 timestamps (OMS §4.1 timestampVerificationData) against a real TSA: `openssl ts -reply` on 127.0.0.1.

openssl is also the independent reader: what `openssl ts -reply -text` and `openssl ts -verify` say about a token
must agree with what msov's verify_timestamp says."""

from __future__ import annotations

import base64
import importlib.util
import hashlib
import re
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from tsa import make_root, running_tsa

from mistral_sov.errors import InputError, VerificationError
from mistral_sov.trust.timestamp import read_timestamps, request_timestamp, timestamp_material, verify_timestamp

SIGNATURE = b"0E\x02 " + bytes(range(32)) + b"\x02!\x00" + bytes(range(32, 64))  # shaped like a DSSE ECDSA sig


@pytest.fixture
def tsa(tmp_path):
    with running_tsa(tmp_path / "tsa") as server:
        yield server


def openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_timestamp_round_trip(tsa):
    before = datetime.now(timezone.utc)
    token = request_timestamp(tsa.url, SIGNATURE)
    when = verify_timestamp(token, SIGNATURE, [tsa.root_pem])
    assert when.tzinfo is not None and when.utcoffset() == timedelta(0)
    # openssl stamps whole seconds (and says ±1 s accuracy)
    assert before - timedelta(seconds=2) <= when <= datetime.now(timezone.utc) + timedelta(seconds=2)


def test_request_is_what_sigstore_sends(tsa, tmp_path):
    request_timestamp(tsa.url, SIGNATURE)
    (query := tmp_path / "query.tsq").write_bytes(tsa.requests[-1])
    text = openssl("ts", "-query", "-in", str(query), "-text")
    assert "Hash Algorithm: sha256" in text and "Certificate required: yes" in text
    assert re.search(r"Nonce: 0x[0-9A-F]+", text)
    assert _hex_dump(text) == hashlib.sha256(SIGNATURE).digest()


def test_openssl_agrees_with_verify(tsa, tmp_path):
    token = request_timestamp(tsa.url, SIGNATURE)
    when = verify_timestamp(token, SIGNATURE, [tsa.root_pem])
    (reply := tmp_path / "reply.tsr").write_bytes(token)
    text = openssl("ts", "-reply", "-in", str(reply), "-text")
    assert "Status: Granted." in text
    stamped = re.search(r"Time stamp: (\w+ +\d+ \d\d:\d\d:\d\d \d{4}) GMT", text).group(1)  # whole seconds
    assert datetime.strptime(stamped, "%b %d %H:%M:%S %Y").replace(tzinfo=timezone.utc) == when
    assert _hex_dump(text) == hashlib.sha256(SIGNATURE).digest()
    verified = openssl("ts", "-verify", "-digest", hashlib.sha256(SIGNATURE).hexdigest(), "-in", str(reply),
                       "-CAfile", str(tsa.root_pem))
    assert "Verification: OK" in verified
    (data := tmp_path / "signature.bin").write_bytes(SIGNATURE)
    assert "Verification: OK" in openssl("ts", "-verify", "-data", str(data), "-in", str(reply),
                                         "-CAfile", str(tsa.root_pem))


def test_bare_token_from_openssl_verifies_too(tsa, tmp_path):
    """Some writers store the TimeStampToken alone (the OMS schema's wording); msov reads either."""
    (reply := tmp_path / "reply.tsr").write_bytes(request_timestamp(tsa.url, SIGNATURE))
    bare = tmp_path / "token.der"
    openssl("ts", "-reply", "-in", str(reply), "-token_out", "-out", str(bare))
    assert verify_timestamp(bare.read_bytes(), SIGNATURE, [tsa.root_pem]) == \
        verify_timestamp(reply.read_bytes(), SIGNATURE, [tsa.root_pem])


def test_stored_token_is_what_sigstore_reads(tsa):
    """sigstore-python and model_signing hand `signedTimestamp` straight to decode_timestamp_response and verify
    it with rfc3161-client: the bytes msov stores must pass that, without msov's reordering."""
    import rfc3161_client
    from cryptography import x509

    token = request_timestamp(tsa.url, SIGNATURE)
    response = rfc3161_client.decode_timestamp_response(token)
    assert response.as_bytes() == token and response.status == 0
    root = x509.load_pem_x509_certificate(tsa.root_pem.read_bytes())
    assert rfc3161_client.VerifierBuilder().add_root_certificate(root).build().verify_message(response, SIGNATURE)


def test_raw_openssl_reply_with_unsorted_certificates_verifies(tsa):
    """`openssl ts` writes the token's certificates (TSA cert, then intermediate) unsorted, which rfc3161-client's
    strict DER parser refuses; verify_timestamp still reads such a token from another writer."""
    import rfc3161_client

    query = (rfc3161_client.TimestampRequestBuilder().data(SIGNATURE)
             .hash_algorithm(rfc3161_client.HashAlgorithm.SHA256).build())
    for _ in range(8):  # DER order is by encoding: find a reply openssl wrote out of order
        raw = tsa.reply(query.as_bytes())
        try:
            rfc3161_client.decode_timestamp_response(raw)
        except ValueError as exc:
            assert "SetOrdering" in str(exc)
            break
    else:
        pytest.skip("openssl happened to write the certificates in DER order every time")
    verify_timestamp(raw, SIGNATURE, [tsa.root_pem])


def test_other_signature_bytes_are_refused(tsa):
    token = request_timestamp(tsa.url, SIGNATURE)
    with pytest.raises(VerificationError, match="over other bytes"):
        verify_timestamp(token, SIGNATURE[:-1] + b"\x00", [tsa.root_pem])


def test_other_root_is_refused(tsa, tmp_path):
    token = request_timestamp(tsa.url, SIGNATURE)
    other, _, _ = make_root(tmp_path / "other", "someone else's root")
    namesake, _, _ = make_root(tmp_path / "namesake")  # same subject as the TSA's root, another key
    for root, why in ((other, "unable to get local issuer certificate"), (namesake, "certificate signature failure")):
        with pytest.raises(VerificationError, match=f"not signed by a TSA that chains to {re.escape(str(root))} "
                                                    f"\\({why}\\)"):
            verify_timestamp(token, SIGNATURE, [root])
    assert verify_timestamp(token, SIGNATURE, [other, tsa.root_pem])  # any one of the roots will do


def test_altered_time_breaks_the_tsa_signature(tsa, tmp_path):
    token = request_timestamp(tsa.url, SIGNATURE)
    times = list(re.finditer(rb"\x18\x0f(\d{14})Z", token))  # genTime: the one GeneralizedTime in the token
    assert len(times) == 1
    # A second off: the certificates are still valid then, so only the TSA's signature can catch it.
    start = times[0].start(1) + 13
    forged = token[:start] + bytes([token[start] ^ 1]) + token[start + 1:]
    with pytest.raises(VerificationError, match="altered after the TSA signed it"):
        verify_timestamp(forged, SIGNATURE, [tsa.root_pem])
    (bad := tmp_path / "forged.tsr").write_bytes(forged)
    done = subprocess.run(["openssl", "ts", "-verify", "-digest", hashlib.sha256(SIGNATURE).hexdigest(), "-in",
                           str(bad), "-CAfile", str(tsa.root_pem)], check=False, capture_output=True, text=True)
    assert done.returncode != 0  # openssl refuses it too


def test_garbage_and_missing_roots(tsa, tmp_path):
    with pytest.raises(VerificationError, match="not an RFC 3161"):
        verify_timestamp(b"\x30\x03\x02\x01\x00junk", SIGNATURE, [tsa.root_pem])
    token = request_timestamp(tsa.url, SIGNATURE)
    with pytest.raises(VerificationError, match="no TSA root"):
        verify_timestamp(token, SIGNATURE, [])
    (not_pem := tmp_path / "root.pem").write_text("not a certificate")
    with pytest.raises(InputError, match="not a PEM certificate"):
        verify_timestamp(token, SIGNATURE, [not_pem])


def test_tsa_down_is_an_input_error_naming_the_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tsr"
    started = time.monotonic()
    with pytest.raises(InputError, match=re.escape(url) + ": cannot reach"):
        request_timestamp(url, SIGNATURE, timeout=2)
    assert time.monotonic() - started < 2


def test_silent_tsa_times_out():
    with socket.socket() as listener:  # accepts connections (backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        started = time.monotonic()
        with pytest.raises(InputError, match=re.escape(url) + ": .*did not answer within 0.5 s"):
            request_timestamp(url, SIGNATURE, timeout=0.5)
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("mode, message", [
    ("http500", "answered HTTP 500"),
    ("garbage", "not an RFC 3161 timestamp response"),
    ("redirect", "answered HTTP 307"),  # not followed: the request goes to the URL given and nowhere else
    ("reject", r"refused the request \(status rejection: Requested policy is not supported.\)"),
    ("wrong_nonce", "nonce is not the one msov sent"),
    ("wrong_imprint", "stamped other bytes"),
])
def test_misbehaving_tsa_is_an_input_error(tsa, mode, message):
    tsa.mode = mode
    with pytest.raises(InputError, match=re.escape(tsa.url) + ": .*" + message):
        request_timestamp(tsa.url, SIGNATURE)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/tsr", "file:///etc/passwd", "127.0.0.1:318"])
def test_only_http_urls(url):
    with pytest.raises(InputError, match="http:// or https://"):
        request_timestamp(url, SIGNATURE)


def test_bundle_material_round_trip():
    token = b"\x30\x82\x01\x00 fake DER"
    material = timestamp_material(token)
    assert material == {"rfc3161Timestamps": [{"signedTimestamp": base64.b64encode(token).decode()}]}
    assert read_timestamps({"verificationMaterial": {"timestampVerificationData": material}}) == [token]
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff" + token).decode().rstrip("=")  # protobuf JSON allows it
    bundle = {"verificationMaterial": {"timestampVerificationData": {"rfc3161Timestamps": [
        {"signedTimestamp": urlsafe}]}}}
    assert read_timestamps(bundle) == [b"\xfb\xff" + token]
    for absent in ({}, {"verificationMaterial": {}}, {"verificationMaterial": {"timestampVerificationData": {}}},
                   {"verificationMaterial": {"timestampVerificationData": {"rfc3161Timestamps": []}}}):
        assert read_timestamps(absent) == []
    for bad in ("not base64!", "", 42):
        with pytest.raises(VerificationError, match=r"rfc3161Timestamps\[0\]"):
            read_timestamps({"verificationMaterial": {"timestampVerificationData": {"rfc3161Timestamps": [
                {"signedTimestamp": bad}]}}})


def _hex_dump(text: str) -> bytes:
    """The bytes of openssl's `Message data:` hex dump."""
    block = text.split("Message data:", 1)[1]
    rows = re.findall(r"^\s+[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]){1,16})", block, re.MULTILINE)
    return bytes.fromhex("".join(rows).replace("-", " "))


# -- the CLI: `msov sign --tsa URL`, `msov verify --tsa-ca ROOT` ----------------------------------------------------

def test_sign_with_a_tsa_then_verify_reports_the_checked_signing_time(tsa, cli, tmp_path):
    import json

    from mistral_sov.trust.keys import generate_keypair

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(bytes(range(256)) * 16)
    key, pub = generate_keypair(tmp_path / "signer")
    before = datetime.now(timezone.utc)
    signed = cli("sign", folder, "--key", key, "--tsa", tsa.url, "--json")
    assert signed.exit_code == 0, signed.output
    bundle = json.loads((tmp_path / "model.sig").read_text())
    assert len(read_timestamps(bundle)) == 1
    if importlib.util.find_spec("model_signing"):  # the reference verifier still accepts the timestamped bundle
        import sys

        done = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(folder), "--signature",
                               str(tmp_path / "model.sig"), "--public_key", str(pub)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    checked = cli("verify", folder, "--key", pub, "--tsa-ca", tsa.root_pem, "--json")
    assert checked.exit_code == 0, checked.output
    signer = json.loads(checked.stdout)["key"]
    signed_at = datetime.fromisoformat(signer["signed_at"])
    assert signer["timestamp"] == "verified" and abs((signed_at - before).total_seconds()) < 60
    screen = cli("verify", folder, "--key", pub, "--tsa-ca", tsa.root_pem)
    assert "signed at" in screen.stdout

    unchecked = cli("verify", folder, "--key", pub, "--json")  # still verifies; says the time is not vouched for
    assert unchecked.exit_code == 0 and "not checked" in json.loads(unchecked.stdout)["key"]["timestamp"]
    other_root, _, _ = make_root(tmp_path / "other")
    refused = cli("verify", folder, "--key", pub, "--tsa-ca", other_root, "--json")
    assert refused.exit_code == 4, refused.output

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("a\n")
    assert cli("sign", plain, "--key", key).exit_code == 0
    asked = cli("verify", plain, "--key", pub, "--tsa-ca", tsa.root_pem, "--json")
    assert asked.exit_code == 4 and "no RFC 3161 timestamp" in json.loads(asked.stdout)["error"]
    down = cli("sign", plain, "--key", key, "--tsa", "http://127.0.0.1:9/", "--json")
    assert down.exit_code == 3 and "127.0.0.1:9" in json.loads(down.stdout)["error"]
