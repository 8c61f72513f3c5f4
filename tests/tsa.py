"""A tiny RFC 3161 timestamp authority on 127.0.0.1 for tests: real tokens, signed by `openssl ts -reply`.

Certificates (made with `cryptography`): a root CA, an intermediate CA and the TSA certificate (EKU timeStamping,
critical, as RFC 3161 §2.3 and `openssl ts` require). The token carries the TSA certificate and the intermediate,
so a verifier needs only the root, as with a real on-prem TSA.

`LocalTSA.mode` makes it misbehave on purpose, each time with bytes openssl signed or a transport fault:
"ok", "http500", "garbage" (200 with non-DER), "redirect" (307 to a TEST-NET address), "reject" (openssl's own
rejection: the request is rewritten to ask for a policy the TSA does not offer), "wrong_nonce" and "wrong_imprint"
(the request is rewritten before openssl signs it, as a replaying or confused TSA would answer).
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

POLICY = "1.3.6.1.4.1.99999.1"  # an arbitrary private-arc OID; the TSA stamps every token with it


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "msov tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer_name, issuer_key, *, ca: bool, path_length: int | None = None,
                 timestamping: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        usage = {"digital_signature": False, "key_cert_sign": True, "crl_sign": True}
    else:
        usage = {"digital_signature": True, "key_cert_sign": False, "crl_sign": False}
    builder = builder.add_extension(x509.KeyUsage(content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False, **usage), critical=True)
    if timestamping:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def make_root(folder: Path, name: str = "msov test TSA root") -> tuple[Path, object, object]:
    """A self-signed CA: (PEM path, certificate, private key)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, None, None, ca=True, path_length=1)
    path = folder / "root.pem"
    path.write_bytes(_pem(cert))
    return path, cert, key


class LocalTSA:
    def __init__(self, folder: Path):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.folder = Path(folder)
        self.root_pem, root, root_key = make_root(self.folder)
        inter_key, tsa_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        intermediate = _certificate("msov test TSA intermediate", inter_key, root.subject, root_key, ca=True,
                                    path_length=0)
        self.tsa_cert = _certificate("msov test TSA", tsa_key, intermediate.subject, inter_key, ca=False,
                                     timestamping=True)
        (self.folder / "intermediate.pem").write_bytes(_pem(intermediate))
        (self.folder / "tsa.pem").write_bytes(_pem(self.tsa_cert))
        (self.folder / "tsa.key").write_bytes(tsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (self.folder / "serial").write_text("01\n")
        self.config = self.folder / "tsa.cnf"
        self.config.write_text(
            "[ tsa ]\ndefault_tsa = tsa_config\n\n[ tsa_config ]\n"
            f"dir = {self.folder}\nserial = $dir/serial\ncrypto_device = builtin\n"
            "signer_cert = $dir/tsa.pem\ncerts = $dir/intermediate.pem\nsigner_key = $dir/tsa.key\n"
            f"signer_digest = sha256\ndefault_policy = {POLICY}\ndigests = sha256, sha384, sha512\n"
            "accuracy = secs:1\nordering = no\ntsa_name = no\ness_cert_id_chain = no\ness_cert_id_alg = sha256\n")
        self.mode = "ok"
        self.requests: list[bytes] = []
        self._lock = threading.Lock()  # openssl ts -reply updates the serial file: one at a time
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/tsr"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-tsa", daemon=True)
        self._thread.start()

    def reply(self, query: bytes) -> bytes:
        """What `openssl ts -reply` answers to this TimeStampReq (DER TimeStampResp)."""
        with self._lock, tempfile.TemporaryDirectory(dir=self.folder) as work:
            query_file, reply_file = Path(work) / "query.tsq", Path(work) / "reply.tsr"
            query_file.write_bytes(query)
            done = subprocess.run(["openssl", "ts", "-reply", "-config", str(self.config), "-queryfile",
                                   str(query_file), "-out", str(reply_file)], check=False, capture_output=True,
                                  timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"openssl ts -reply failed: {done.stderr.decode(errors='replace')}")
            return reply_file.read_bytes()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _rewrite(query: bytes, mode: str) -> bytes:
    from asn1crypto import tsp

    request = tsp.TimeStampReq.load(query)
    if mode == "wrong_nonce":
        request["nonce"] = request["nonce"].native + 1
    elif mode == "wrong_imprint":
        imprint = request["message_imprint"]
        imprint["hashed_message"] = secrets.token_bytes(len(imprint["hashed_message"].native))
    elif mode == "reject":
        request["req_policy"] = "1.3.6.1.4.1.99999.2"
    return request.dump(force=True)


def _handler(tsa: LocalTSA):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            query = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            tsa.requests.append(query)
            if tsa.mode == "http500":
                return self._answer(500, b"internal error")
            if tsa.mode == "garbage":
                return self._answer(200, b"this is not DER")
            if tsa.mode == "redirect":
                return self._answer(307, b"", location="http://192.0.2.1/tsr")
            if self.headers.get("Content-Type") != "application/timestamp-query":
                return self._answer(415, b"expected application/timestamp-query")
            if tsa.mode != "ok":
                query = _rewrite(query, tsa.mode)
            self._answer(200, tsa.reply(query))

        def _answer(self, code: int, body: bytes, location: str | None = None):
            self.send_response(code)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest's output clean
            pass

    return Handler


def require_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the `openssl` command is not installed (Debian package openssl); the test TSA runs it")


@contextmanager
def running_tsa(folder: Path):
    """A LocalTSA serving in FOLDER for the `with` block; skips the test where openssl is missing. A test file's
    fixture: `@pytest.fixture` / `def tsa(tmp_path):` / `with running_tsa(tmp_path / "tsa") as server: yield server`."""
    require_openssl()
    server = LocalTSA(folder)
    try:
        yield server
    finally:
        server.stop()
