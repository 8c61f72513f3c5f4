"""The fixed folder every historical release signs (a few files, a nested folder, a unicode name)."""
import pathlib, sys
root = pathlib.Path(sys.argv[1])
files = {
    "config.json": b'{"model_type": "tiny", "hidden_size": 8}\n',
    "weights.bin": bytes(range(256)),
    "nested/adapter.bin": b"adapter\x00\x01\x02\n",
    "nested/deeper/\u6a21\u578b-\u00fc.txt": "unicode name \u6a21\u578b\n".encode(),
    "ignore-me": b"a local cache file the signer chose not to sign\n",
}
for name, data in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
