"""msov: sovereign LoRA/QLoRA fine-tuning of local open-weight LLMs."""

__version__ = "0.1.0"
