"""The published offline path, as its users run it: okekeclean 1.1.0's detect_artifacts on one recording.

    python benchmarks/okekeclean_score.py RECORDING.csv CHECKPOINT.pth OUT.csv

Run in its own process by benchmarks/bench_vs_okekeclean.py with okekeclean importable (it is not a
dependency of this project). RECORDING.csv: `timestamp_ns,<lead>` as `streamer synth` writes it.
Writes one row per 10-s window: start_ns, probability.
"""

import sys

import numpy as np
import okekeclean.api as api
import pandas as pd
import torch
from okekeclean.models import EfficientNetB0
from okekeclean.types import ECGParams


def main() -> None:
    rec, ckpt, out = sys.argv[1:4]
    df = pd.read_csv(rec)
    waveform = pd.Series(df.iloc[:, 1].to_numpy(np.float64), index=pd.to_datetime(df["timestamp_ns"], unit="ns"))
    model = EfficientNetB0(image_size=224, threshold=0.5, modality="ECG")
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.eval()
    seen = {}
    segment_ecg, run_inference = api.segment_ecg, api.run_inference

    def segments_of(*a, **kw):  # the per-window probabilities, as detect_artifacts computes them
        seen["segments"] = segment_ecg(*a, **kw)
        return seen["segments"]

    def inference(*a, **kw):
        seen["scores"] = run_inference(*a, **kw)
        return seen["scores"]

    api.segment_ecg, api.run_inference = segments_of, inference
    api.detect_artifacts(waveform, "ECG", model, ECGParams(), torch.device("cpu"), return_type="probability")
    starts = seen["segments"]["start_time"].astype("int64").to_numpy()
    pd.DataFrame({"start_ns": starts, "probability": np.asarray(seen["scores"], dtype=np.float64)}).to_csv(
        out, index=False)


if __name__ == "__main__":
    main()
