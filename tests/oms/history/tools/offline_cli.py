"""Run the release's own `python -m model_signing` CLI offline: its signing.Config() constructor builds a
Sigstore signing context by default (a network fetch of TUF metadata) that `sign key` then replaces unused, so
only that default is skipped; everything `sign key` writes is the release's own code."""
import runpy

import model_signing.signing as signing


def _init(self):
    self._hashing_config = signing.hashing.Config()


signing.Config.__init__ = _init
runpy.run_module("model_signing", run_name="__main__")
