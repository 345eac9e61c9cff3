"""structlog setup: JSON lines in production, readable console output in a terminal.

Every line goes through one stdlib handler, so the libraries' own log records (aiokafka's connection and
rebalance messages, asyncio's) come out as the same JSON, with logger, service and version, as ours.
Never log waveform samples: events carry ids, counts and reasons only, and other libraries' lines stop at
info (their debug lines carry raw message keys and values).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys

import structlog

# Ids are hashed by default, before configure_logging too. Without a configured key, with a random key of
# this process: references agree within one run and link to nothing outside it (neither the id, nor another
# run's logs, nor another worker's).
_PROCESS_KEY = secrets.token_bytes(32)
_patient_mode = "hashed"
_patient_key = _PROCESS_KEY
_json = False
_said_process_key = False


def _service(_, __, event_dict):
    from streamer._version import __version__

    event_dict.setdefault("service", "streamer")
    event_dict.setdefault("version", __version__)
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info", patient_ids: str = "plain",
                      patient_key: bytes | None = None) -> None:
    """`patient_ids`: plain, hashed (HMAC-SHA-256 with `patient_key`, or without one this process's random
    key, said once in a log line) or omit."""
    global _patient_mode, _patient_key, _json, _said_process_key
    if patient_ids not in ("plain", "hashed", "omit"):
        raise ValueError(f"patient_ids must be plain, hashed or omit, not {patient_ids!r}")
    _patient_mode, _patient_key = patient_ids, patient_key or _PROCESS_KEY
    _json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    threshold = getattr(logging, level.upper())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if _json:
        shared.append(_service)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    renderer = structlog.processors.JSONRenderer() if _json else structlog.dev.ConsoleRenderer()
    handler = _StderrHandler()
    handler.addFilter(_library_cap)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    for name in _CHATTY:  # spares them formatting requests nobody may read
        logging.getLogger(name).setLevel(max(threshold, logging.INFO))
    logging.captureWarnings(True)  # warnings.warn from libraries: a log line too, not bare text
    if patient_ids == "hashed" and not patient_key and not _said_process_key:
        _said_process_key = True
        get_logger("streamer.logs").info(
            "patient_ids_hashed_with_process_key", detail="patient ids in these logs are keyed with a random key of "
            "this process: consistent within this run only; set patient_id_log_key(_file) to link runs and workers")


# Libraries write whole requests at debug level: aiokafka's "Sending request" lines hold message keys
# (patient ids, never hashed) and values (ECG samples). Only streamer's own events go below info.
_CHATTY = ("aiokafka", "kafka", "aiohttp", "asyncio")


def _library_cap(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.INFO or record.name == "streamer" or record.name.startswith("streamer.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is emitted (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def json_logs() -> bool:
    """Whether log lines are JSON: a command's final error then goes out as one more JSON line."""
    return _json


def patient_ref(patient_id: str) -> str | None:
    """The patient identifier as logs may show it (plain, hashed or omitted by setting).

    Hashed is keyed (HMAC-SHA-256): an unkeyed hash of a medical record number is reversed by hashing
    every possible number. The same configured key gives the same reference across restarts and workers;
    the process's random key (no key configured) only within this process."""
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


def printable(text: str) -> str:
    """`text` with every non-printable character escaped (as Python writes it): text from a record or a
    peer reaches an operator's terminal or a log, where an escape sequence could erase lines or write fake
    ones."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
