"""The trainer's one error type, apart so that every training module can raise it without importing another."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad flag, file or combination; the message is one sentence naming the flag or file and what to do.
    Raised before anything is written."""
