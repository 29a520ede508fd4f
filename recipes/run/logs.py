"""Log records of the recipes: one line each on stderr (``time level message``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["logger", "setup_logging"]

logger = logging.getLogger("recipes")


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tests and notebooks may swap)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One-line records of the ``recipes`` logger on stderr (``time level message``).

    The root logger is left alone (records still propagate to it, e.g. to pytest's caplog).
    """
    logger.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
