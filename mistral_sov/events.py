"""Progress events: a library stage reports `(kind, payload)` to a sink that only the CLI renders.

Kinds: "stage" ({"text"}), "warning" ({"text"}), "step"/"log"/"train_end" (training progress). The default sink
drops them, so library calls stay silent unless a caller asks to hear.
"""

from __future__ import annotations

from typing import Callable

EventSink = Callable[[str, dict], None]


def no_events(_kind: str, _payload: dict) -> None:
    """The sink for callers that do not listen."""
