"""structlog setup: JSON lines in production, readable console output in a terminal.

Never log waveform samples: events carry ids, counts and reasons only.
"""

from __future__ import annotations

import hashlib
import logging
import sys

import structlog

_patient_mode = "plain"


def configure_logging(fmt: str = "auto", level: str = "info", patient_ids: str = "plain") -> None:
    global _patient_mode
    _patient_mode = patient_ids
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def patient_ref(patient_id: str) -> str | None:
    """The patient identifier as logs may show it (plain, hashed or omitted by setting)."""
    if _patient_mode == "plain":
        return patient_id
    if _patient_mode == "hashed":
        return hashlib.sha256(patient_id.encode()).hexdigest()[:16]
    return None


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
