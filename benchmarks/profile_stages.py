"""Where the live worker's CPU goes, by stage: py-spy's sampled stacks (raw, one `frames count` line per
distinct stack) folded into the data path's stages.

A stack is charged to the first stage in STAGES that any of its frames matches, so the model called from
the scorer counts as the model, a record batch built for a transaction counts as the transaction, and
what is left of aiokafka's consumer counts as the fetch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# (stage, substrings of a frame's "function (file:line)"), in priority order
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("onnxruntime", "streamer/model/backends.py", "/torch/")),
    ("preprocessing", ("streamer/model/preprocess.py", "/scipy/")),
    ("resampling", ("streamer/windows/resample.py",)),
    ("scoring (batch, retries)", ("streamer/model/",)),
    ("event time and clock offset", ("streamer/delivery/event_time.py",)),
    ("transactions and commits", ("streamer/checkpointing/", "streamer/delivery/", "transaction_manager",
                                  "send_offsets_to_transaction",
                                  "commit_transaction", "begin_transaction")),
    ("flag and episode serialisation", ("streamer/publish/messages.py", "streamer/state/patients.py",
                                        "streamer/state/changelog.py")),
    ("episodes", ("streamer/publish/episodes.py",)),
    ("publish (sends)", ("streamer/publish/", "aiokafka/producer")),
    ("decode", ("streamer/ingest/contract.py",)),
    ("dead letters", ("streamer/ingest/deadletter.py",)),
    ("windows", ("streamer/windows/",)),
    ("upkeep and gauges", ("streamer/runtime/upkeep.py", "streamer/metrics.py", "prometheus_client")),
    ("kafka fetch and record parsing", ("aiokafka/consumer", "aiokafka/record")),
    ("kafka protocol and connections", ("aiokafka/",)),
    ("logging", ("structlog", "/logging/")),
    ("worker loops", ("streamer/",)),
    ("event loop", ("asyncio/", "selectors.py", "uvloop")),
]
OTHER = "other"
# py-spy's nonblocking sampling cannot tell a thread waiting in select from one running: a stack whose
# innermost frame is the selector's wait is the event loop idle, not CPU (two thirds of "worker loops"
# at 400 beds)
IDLE = "idle (event loop waiting)"


def stage_of(frames: list[str]) -> str:
    if frames and frames[-1].startswith(("EpollSelector.select (selectors.py", "select (selectors.py")):
        return IDLE
    for stage, needles in STAGES:
        if any(n in f for f in frames for n in needles):
            return stage
    return OTHER


def fold(raw: str) -> Counter:
    """Samples per stage from py-spy's raw output."""
    by_stage: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        by_stage[stage_of(stack.split(";"))] += int(count)
    return by_stage


def table(raw_path: Path, rate_hz: int, windows: int, records: int) -> list[tuple[str, float, float, float]]:
    """[(stage, CPU ms per window, CPU us per input record, share of the sampled CPU)], largest first; the
    event loop's idle waits left out."""
    by_stage = fold(raw_path.read_text())
    by_stage.pop(IDLE, None)
    total = sum(by_stage.values()) or 1
    rows = []
    for stage, n in by_stage.most_common():
        cpu_s = n / rate_hz
        rows.append((stage, cpu_s * 1000 / max(windows, 1), cpu_s * 1e6 / max(records, 1), n / total))
    return rows
