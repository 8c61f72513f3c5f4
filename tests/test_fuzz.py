"""Bad input never gets a traceback: random recipes and data rows give a clean MsovError or load fine."""

import json
import os
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_sov.data import load_data_file, tokenize_records
from mistral_sov.errors import MsovError
from mistral_sov.recipe import load_recipe

FUZZ = settings(max_examples=int(os.environ.get("MSOV_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
SECTIONS = ["name", "model", "data", "lora", "train", "output", "quantization", "description"]
FIELDS = ["path", "train", "eval", "format", "r", "alpha", "lr", "epochs", "max_steps", "batch_size", "dir",
          "seed", "dtype", "target_modules", "max_seq_len", "bits", "chat_template", "train_on", "overlong"]
recipes = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)),
    max_size=8,
)


def _expect_clean(call):
    try:
        return call()
    except MsovError as exc:
        assert exc.message and exc.exit_code in (2, 3, 5)
        return None


@FUZZ
@given(raw=recipes, overrides=st.lists(st.text(max_size=20), max_size=3))
def test_random_recipes_fail_cleanly(raw, overrides, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _expect_clean(lambda: load_recipe(path, overrides))


@FUZZ
@given(text=st.binary(max_size=400))
def test_random_recipe_bytes_fail_cleanly(text, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    _expect_clean(lambda: load_recipe(path))


roles = st.sampled_from(["system", "user", "assistant", "bot", "", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=40), st.none(),
                                                                                st.integers())}), max_size=5)
rows = st.one_of(
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"instruction": st.one_of(st.text(max_size=30), st.integers()),
                           "output": st.one_of(st.text(max_size=30), st.none())},
                          optional={"input": st.one_of(st.text(max_size=10), st.none(), st.lists(st.integers()))}),
    st.fixed_dictionaries({}, optional={"text": json_values, "prompt": json_values, "completion": json_values}),
    json_values,
)


@FUZZ
@given(data=st.lists(rows, max_size=6), suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       fmt=st.sampled_from(["auto", "chat", "instruction", "completion"]), junk=st.binary(max_size=30))
def test_random_data_rows_fail_cleanly(data, suffix, fmt, junk, tmp_path, tokenizer):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in data) + junk)
    elif suffix == ".json":
        path.write_bytes(json.dumps(data).encode() + (junk if len(junk) % 2 else b""))
    else:
        keys = sorted({k for r in data if isinstance(r, dict) for k in r}) or ["text"]
        lines = [",".join(keys)] + [",".join(json.dumps(r.get(k)) if isinstance(r, dict) else "x" for k in keys)
                                    for r in data]
        path.write_bytes("\n".join(lines).encode() + junk)
    loaded = _expect_clean(lambda: load_data_file(path, fmt))
    if loaded is not None:
        _expect_clean(lambda: tokenize_records(loaded.records, tokenizer, max_seq_len=16, overlong="drop"))


def test_huge_line_and_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "' + b"a" * 2_000_000 + b'"}\n\xff\xfe{"text": 1}\n')
    _expect_clean(lambda: load_data_file(path))
    assert _expect_clean(lambda: load_data_file(Path(tmp_path / "missing.parquet"))) is None


# -- the shared output and secret checks, over random folder trees ---------------------------------------------

from mistral_sov.guard.paths import refuse_overlap  # noqa: E402
from mistral_sov.trust.keys import refuse_secrets  # noqa: E402

parts = st.lists(st.sampled_from(["a", "b", "c", ".d", "ü"]), min_size=1, max_size=4)


@FUZZ
@given(output=parts, inputs=st.lists(parts, min_size=1, max_size=3), link=st.booleans())
def test_an_output_overlapping_any_input_is_refused_however_spelled(tmp_path_factory, output, inputs, link):
    """Refused exactly when the output is, contains or lies inside an input, also when reached through a link."""
    root = tmp_path_factory.mktemp("overlap")
    (root / "real").mkdir()
    if link:
        (root / "via").symlink_to(root / "real")
    top = root / ("via" if link else "real")
    out = top.joinpath(*output)
    srcs = [root / "real" / Path(*p) for p in inputs]
    overlaps = any(tuple(output[:len(p)]) == tuple(p) or tuple(p[:len(output)]) == tuple(output) for p in inputs)
    try:
        refuse_overlap(out, srcs, what="--out")
        refused = False
    except MsovError as exc:
        refused = exc.exit_code == 3
    assert refused == overlaps


@FUZZ
@given(tree=st.lists(parts, min_size=1, max_size=6), secret=st.sampled_from(
    [None, "link", "pkcs8", "ec", "encrypted", "copy"]), where=st.integers(0, 5))
def test_a_folder_with_a_link_a_private_key_or_a_copy_of_the_key_is_refused(tmp_path_factory, tree, secret, where):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("secrets")
    folder = root / "out"
    folder.mkdir()
    files = []
    for i, p in enumerate(tree):
        target = folder.joinpath(*p[:-1], f"f{i}-{p[-1]}.txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"plain text {i}\n")
        files.append(target)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = {"pkcs8": serialization.PrivateFormat.PKCS8, "ec": serialization.PrivateFormat.TraditionalOpenSSL}
    key_file = root / "signer.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    victim = files[where % len(files)]
    if secret == "link":
        victim.unlink()
        victim.symlink_to(key_file)
    elif secret in pem:
        victim.write_bytes(key.private_bytes(serialization.Encoding.PEM, pem[secret], serialization.NoEncryption()))
    elif secret == "encrypted":
        victim.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.BestAvailableEncryption(b"pw")))
    elif secret == "copy":
        victim.write_bytes(key_file.read_bytes() + b"")
        victim.with_suffix(".b64").write_text("not a key\n")
    try:
        refuse_secrets(folder, key=key_file)
        refused = False
    except MsovError as exc:
        refused = exc.exit_code == 3 and victim.name in str(exc)
    assert refused == (secret is not None)
