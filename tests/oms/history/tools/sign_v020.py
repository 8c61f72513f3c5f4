"""model_signing 0.2.0 has no CLI: key signing is its library's ECKeySigner inside an IntotoSigner, over the
DigestsIntotoPayload its SigningConfig uses by default (predicateType https://model_signing/Digests/v0.1)."""
import pathlib, sys
from model_signing import api
from model_signing.signature import key
from model_signing.signing import in_toto, in_toto_signature

model, private_key, signature, *ignore = map(pathlib.Path, sys.argv[1:])
manifest = api.HashingConfig().set_ignored_paths(ignore).hash(model)
payload = in_toto.DigestsIntotoPayload.from_manifest(manifest)
signer = in_toto_signature.IntotoSigner(key.ECKeySigner.from_path(str(private_key)))
signer.sign(payload).write(signature)
