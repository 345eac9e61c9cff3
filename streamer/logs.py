"""structlog setup: JSON lines in production, readable console output in a terminal.

Never log waveform samples: events carry ids, counts and reasons only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys

import structlog

_patient_mode = "plain"
_patient_key = b""


def configure_logging(fmt: str = "auto", level: str = "info", patient_ids: str = "plain",
                      patient_key: bytes | None = None) -> None:
    """`patient_ids`: plain, hashed (HMAC-SHA-256 with `patient_key`) or omit."""
    global _patient_mode, _patient_key
    if patient_ids == "hashed" and not patient_key:
        raise ValueError("hashed patient ids need a key (patient_id_log_key or patient_id_log_key_file)")
    _patient_mode, _patient_key = patient_ids, patient_key or b""
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
    """The patient identifier as logs may show it (plain, hashed or omitted by setting).

    Hashed is keyed (HMAC-SHA-256): an unkeyed hash of a medical record number is reversed by hashing
    every possible number. The same key gives the same reference across restarts and workers."""
    if _patient_mode == "plain":
        return patient_id
    if _patient_mode == "hashed":
        return hmac.new(_patient_key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]
    return None


def episode_ref(patient_id: str, start_ns: int) -> str | None:
    """An episode as logs may show it: its id is patient:start, so it follows the patient setting."""
    ref = patient_ref(patient_id)
    return None if ref is None else f"{ref}:{start_ns}"


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
