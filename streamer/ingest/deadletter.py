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
