"""Dead-letter records: the original key and bytes, with the reason and source position in headers."""

from __future__ import annotations


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason.encode()),
        ("detail", detail.encode("utf-8", "replace")[:1000]),
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]


def headers_dict(headers) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}


def oversized_dead_letter(record, headers: list[tuple[str, bytes]], error: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter the producer refused (too large with its headers): a small one in its place that
    identifies the original (size and SHA-256 of its value, its position and original headers)."""
    import hashlib

    import orjson

    value = record.value or b""
    summary = {
        "value_omitted": "too_large",
        "value_size": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "original_headers": {k: v.decode("utf-8", "replace")[:200] for k, v in (record.headers or [])},
        "error": error[:200],
    }
    return orjson.dumps(summary), [*headers, ("value_omitted", b"too_large")]
