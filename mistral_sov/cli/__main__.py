"""`python -m mistral_sov.cli ...`: the same CLI as `msov` (tests and launchers start it this way)."""

from . import app

app()
