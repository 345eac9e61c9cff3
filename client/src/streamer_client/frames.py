"""The binary input frame (schemas/ecg-chunk-binary.v1.md) for gateways: standard library only, so a monitor
gateway writes frames without installing the worker. The worker reads the same layout (HEADER here).

    from streamer_client.frames import encode_frame
    value = encode_frame("bed-12", t0_ns, 500.0, samples_mv, seq=41)       # float32 millivolts
    value = encode_frame("bed-12", t0_ns, 500.0, counts, counts_gain=200.0)  # int16 ADC counts, as sent
    producer.send("ecg.lead2", value, key=b"bed-12")                         # key: the same patient id
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence

MAGIC = b"ECG1"
FORMAT_VERSION = 1
DTYPE_FLOAT32_MV = 1
DTYPE_INT16_COUNTS = 2
NO_VALUE = -(1 << 63)  # int64 sentinel for "absent" in the header
HEADER = struct.Struct("<4sBBHdqqqddI8sH")  # little-endian, no padding: 70 bytes


def frame_header(patient_id: bytes, lead: bytes, t0_ns: int, fs: float, n_samples: int, dtype: int,
                 gain: float = 1.0, baseline: float = 0.0, seq: int | None = None,
                 segment_start_ns: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, dtype, 0, float(fs), int(t0_ns),
                       NO_VALUE if segment_start_ns is None else int(segment_start_ns),
                       NO_VALUE if seq is None else int(seq), float(gain), float(baseline), n_samples, lead[:8],
                       len(patient_id))


def encode_frame(patient_id: str, t0_ns: int, fs: float, samples: Sequence[float], lead: str = "II",
                 seq: int | None = None, segment_start_ns: int | None = None, counts_gain: float | None = None,
                 baseline: float = 0.0) -> bytes:
    """One frame. `samples`: millivolts (float32 on the wire), or, with `counts_gain` (counts per mV), ADC
    counts sent as int16 (the worker computes mV = (counts - baseline) / gain); counts outside int16 are
    refused, never clipped silently."""
    pid = patient_id.encode("utf-8")
    if not 1 <= len(patient_id) <= 128:
        raise ValueError("patient_id must have 1 to 128 characters")
    if not (math.isfinite(fs) and fs > 0):
        raise ValueError(f"fs must be a positive number, not {fs!r}")
    if counts_gain is None:
        body = array("f", samples)
        dtype, gain = DTYPE_FLOAT32_MV, 1.0
    else:
        if not (math.isfinite(counts_gain) and counts_gain != 0):
            raise ValueError("counts_gain must be a finite non-zero number (counts per mV)")
        values = [round(v) for v in samples]
        if any(not -32768 <= v <= 32767 for v in values):
            raise ValueError("counts outside the int16 range: send millivolts (float32) instead")
        body = array("h", values)
        dtype, gain = DTYPE_INT16_COUNTS, counts_gain
    if sys.byteorder != "little":
        body.byteswap()
    header = frame_header(pid, lead.encode("ascii"), t0_ns, fs, len(body), dtype, gain, baseline, seq,
                          segment_start_ns)
    return header + pid + body.tobytes()
