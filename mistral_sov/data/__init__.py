"""Training data: load and check files (file:line errors), normalise to one record form, tokenise with loss masks.

Importing this package stays cheap (no torch, transformers or datasets) so that `msov --help` is instant;
the heavy libraries are imported inside the functions that need them.
"""

from .formats import FORMATS, detect_format
from .loading import LoadedData, iter_records, load_data_file
from .tokens import TokenizedData, TokenStats, preference_conversations, render_prompt, tokenize_records

__all__ = ["FORMATS", "LoadedData", "TokenStats", "TokenizedData", "detect_format", "iter_records", "load_data_file",
           "preference_conversations", "render_prompt", "tokenize_records"]
