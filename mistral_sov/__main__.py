"""`python -m mistral_sov ...`: the same CLI, for launchers (`accelerate launch -m mistral_sov`, `torchrun -m`)."""

from .cli import app

app(prog_name="msov")
