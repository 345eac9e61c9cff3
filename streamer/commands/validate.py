"""`streamer validate`: flags + labels -> metrics with confidence intervals, parity, retuned threshold, report.

Flags: the CSV of `streamer score`, or JSON lines of the flags topic (one flag per line), or
`kafka:TOPIC` to read the flags topic itself. Labels: a CSV with either
  window labels: [patient_id,] window_start_ns, label (1 = artifact)
  intervals:     [patient_id,] start_ns, end_ns          (artifact stretches; a window is artifact when
                                                          at least 20 % of it lies inside them)
Without a patient_id column everything belongs to one patient, "recording". A `kind` column (artifact
kind: motion, electrode, ...) adds a sensitivity per kind. Patients with flags but no label at all are
left out and named (`--unlabelled-clean` counts them as clean instead: only when the labels file lists
every artifact of every patient). Intervals come from a patient-clustered bootstrap: a patient's windows
are correlated, so patients, not windows, are resampled.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from streamer.model.decision import is_artifact
from streamer.offline.evaluation import (ClusteredBootstrap, auprc, auroc, bootstrap_ci, bootstrap_method, confusion,
                                         roc_curve, threshold_for_sensitivity, threshold_for_specificity)
from streamer.synthetic import ARTIFACT_SHARE

from streamer.spec import WINDOW_NS  # noqa: E402


def load_flags(source: str, kafka=None, patient: str = "recording") -> pd.DataFrame:
    if source.startswith("kafka:"):
        import asyncio

        from streamer.kafka.clients import read_records

        records = asyncio.run(read_records(kafka, [source.split(":", 1)[1]], timeout_s=600, idle_polls=5))
        df = pd.DataFrame([orjson.loads(r.value) for r in records])
    elif source.endswith((".jsonl", ".json", ".ndjson")):
        df = pd.DataFrame([orjson.loads(line) for line in Path(source).read_bytes().splitlines() if line.strip()])
    else:
        df = pd.read_csv(source)
    if "patient_id" not in df:
        df["patient_id"] = patient
    if "status" in df:
        df = df[df["status"] == "scored"]
    df = df.dropna(subset=["probability"])
    # a window re-published after a restart appears twice with the same identity: keep one
    return df.drop_duplicates(["patient_id", "window_start_ns"], keep="last").reset_index(drop=True)


def read_labels(labels_path: str, patient: str = "recording") -> pd.DataFrame:
    if str(labels_path).lower().endswith((".edf", ".bdf")):
        from streamer.offline.recordings import edf_annotations

        return edf_annotations(labels_path).assign(patient_id=patient)
    return pd.read_csv(labels_path)


def attach_labels(flags: pd.DataFrame, labels_path: str, unlabelled_clean: bool = False,
                  patient: str = "recording") -> tuple[pd.DataFrame, list[str]]:
    """(flags with a `label` column (and `kind` when the labels carry one), patients left out). A patient
    the labels never mention is left out, not counted as clean: nobody looked at its ECG."""
    labels = read_labels(labels_path, patient)
    if "patient_id" not in labels:
        labels["patient_id"] = "recording"
    labels["patient_id"] = labels["patient_id"].astype(str)
    flags = flags.assign(patient_id=flags["patient_id"].astype(str))
    unlabelled = sorted(set(flags["patient_id"]) - set(labels["patient_id"]))
    if not unlabelled_clean:
        flags = flags[~flags["patient_id"].isin(unlabelled)]
    kinds = "kind" in labels
    if "label" in labels:
        keep = ["patient_id", "window_start_ns", "label"] + (["kind"] if kinds else [])
        merged = flags.merge(labels[keep], on=["patient_id", "window_start_ns"], how="left" if unlabelled_clean
                             else "inner")
        merged["label"] = merged["label"].fillna(0).astype(bool)
        return merged.reset_index(drop=True), [] if unlabelled_clean else unlabelled
    if not {"start_ns", "end_ns"} <= set(labels):
        raise ValueError("labels need columns window_start_ns,label or start_ns,end_ns")
    out = flags.copy().reset_index(drop=True)
    ends = out.get("window_end_ns", out["window_start_ns"] + WINDOW_NS)
    share = np.zeros(len(out))
    kind = np.full(len(out), None, dtype=object)
    for pid, group in labels.groupby("patient_id"):
        rows = np.flatnonzero(out["patient_id"].to_numpy() == pid)
        for r in rows:
            s, e = out["window_start_ns"].iat[r], ends.iat[r]
            overlap = (np.minimum(group["end_ns"], e) - np.maximum(group["start_ns"], s)).clip(lower=0)
            share[r] = overlap.sum() / (e - s)
            if kinds and overlap.max() > 0:
                kind[r] = group["kind"].iat[int(np.argmax(overlap.to_numpy()))]
    out["label"] = share >= ARTIFACT_SHARE
    if kinds:
        out["kind"] = np.where(out["label"], kind, None)
    return out, [] if unlabelled_clean else unlabelled


def metrics_table(df: pd.DataFrame, threshold: float, n_boot: int, seed: int, progress: bool = False) -> pd.DataFrame:
    rows = []
    groups = [("overall", df)]
    if df["patient_id"].nunique() > 1:
        groups += [(str(pid), g) for pid, g in df.groupby("patient_id")]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_boot * len(groups), unit="resample", desc="bootstrap")
    for name, g in groups:
        y, p = g["label"].to_numpy(bool), g["probability"].to_numpy(float)
        c = confusion(y, is_artifact(p, threshold))
        row = {"group": name, "windows": len(g), "artifact_share": y.mean() if len(y) else math.nan, **c.as_dict(),
               "auroc": auroc(y, p), "auprc": auprc(y, p)}
        boot = ClusteredBootstrap(y, p, g["patient_id"].to_numpy(), threshold)
        for metric, (lo, hi) in boot.intervals(n_boot, seed, progress=bar.update if bar else None).items():
            row[f"{metric}_ci"] = f"[{lo:.3f}, {hi:.3f}]"
        rows.append(row)
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows)


def kind_table(df: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> pd.DataFrame | None:
    """Sensitivity per artifact kind, when the labels carry one."""
    if "kind" not in df:
        return None
    rows = []
    for kind, g in df[df["label"] & df["kind"].notna()].groupby("kind"):
        hit = is_artifact(g["probability"].to_numpy(float), threshold)
        lo, hi = bootstrap_ci(lambda a, b: float(is_artifact(b, threshold).mean()), np.ones(len(g), bool),
                              g["probability"].to_numpy(float), n=n_boot, seed=seed, groups=g["patient_id"].to_numpy())
        rows.append({"kind": kind, "artifact_windows": len(g), "patients": g["patient_id"].nunique(),
                     "sensitivity": float(hit.mean()), "sensitivity_ci": f"[{lo:.3f}, {hi:.3f}]"})
    return pd.DataFrame(rows)


def parity(stream: pd.DataFrame, offline_csv: str, threshold: float) -> dict:
    off = pd.read_csv(offline_csv)
    if "patient_id" not in off:
        off["patient_id"] = stream["patient_id"].iloc[0]
    m = stream.merge(off, on=["patient_id", "window_start_ns"], suffixes=("_stream", "_offline"))
    dp = (m["probability_stream"] - m["probability_offline"]).abs()
    return {"stream_windows": len(stream), "offline_windows": len(off), "matched": len(m),
            "max_abs_dp": float(dp.max()) if len(m) else math.nan,
            "flag_disagreements": int((is_artifact(m["probability_stream"], threshold)
                                       != is_artifact(m["probability_offline"], threshold)).sum())}


def retune(df: pd.DataFrame, sensitivity: float | None, specificity: float | None, n_boot: int,
           seed: int) -> dict | None:
    if sensitivity is None and specificity is None:
        return None
    y, p = df["label"].to_numpy(bool), df["probability"].to_numpy(float)
    if sensitivity is not None:
        fn, target, what = threshold_for_sensitivity, sensitivity, "sensitivity"
    else:
        fn, target, what = threshold_for_specificity, specificity, "specificity"
    thr = fn(y, p, target)
    lo, hi = bootstrap_ci(lambda a, b: fn(a, b, target) if a.any() and (~a).any() else math.nan, y, p, n=n_boot,
                          seed=seed, groups=df["patient_id"].to_numpy())
    c = confusion(y, is_artifact(p, thr))
    return {"target": f"{what} >= {target}", "threshold": thr, "threshold_ci": (lo, hi),
            "sensitivity": c.sensitivity, "specificity": c.specificity}


def _plots(df: pd.DataFrame, threshold: float, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    y, p = df["label"].to_numpy(bool), df["probability"].to_numpy(float)
    if y.any() and (~y).any():
        fpr, tpr, _ = roc_curve(y, p)
        c = confusion(y, p >= threshold)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, lw=2, label=f"ROC (AU-ROC {auroc(y, p):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.plot(1 - c.specificity, c.sensitivity, "o", color="crimson", label=f"operating point {threshold:.3f}")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}-roc.png", dpi=110)
        plt.close(fig)
        files.append(f"{stem}-roc.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 26)
    ax.hist(p[~y], bins=bins, alpha=0.6, label="clean (label)")
    ax.hist(p[y], bins=bins, alpha=0.6, label="artifact (label)")
    ax.axvline(threshold, color="crimson", ls="--", label="threshold")
    ax.set_xlabel("artifact probability")
    ax.set_ylabel("windows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-hist.png", dpi=110)
    plt.close(fig)
    files.append(f"{stem}-hist.png")
    return files


def strip_plot(times_ns: np.ndarray, values: np.ndarray, flags: pd.DataFrame, threshold: float, path: Path,
               seconds: float = 120.0) -> None:
    """An ECG strip with flagged windows shaded red and labelled-artifact windows underlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = times_ns[0]
    keep = times_ns < t0 + seconds * 1e9
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.plot((times_ns[keep] - t0) / 1e9, values[keep], lw=0.6, color="black")
    for _, f in flags.iterrows():
        s = (f["window_start_ns"] - t0) / 1e9
        if s > seconds:
            continue
        if is_artifact(f["probability"], threshold):
            ax.axvspan(s, s + 10, color="crimson", alpha=0.18)
        if f.get("label", False):
            ax.axvspan(s, s + 10, ymin=0, ymax=0.04, color="navy")
    ax.set_xlabel("seconds (red: flagged as artifact; blue bar: labelled artifact)")
    ax.set_ylabel("mV")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(args, kafka=None, windows=None) -> int:
    """`windows` (WindowSettings): the rate range a --recording must keep to (the stream's)."""
    rec = None
    if getattr(args, "recording", None):  # read (and refused) before any metric is computed
        from streamer.offline.recordings import RecordingLimits, load_recording

        limits = RecordingLimits.of(windows, getattr(args, "max_recording_hours", None))
        rec = load_recording(args.recording, fs=args.fs, start=args.start, channel=args.channel,
                             time_unit=args.time_unit, units=getattr(args, "units", None), limits=limits)
    sources = [args.flags] if isinstance(args.flags, str) else args.flags
    flags = pd.concat([load_flags(f, kafka, getattr(args, "patient", "recording")) for f in sources],
                      ignore_index=True)
    df, unlabelled = attach_labels(flags, args.labels, getattr(args, "unlabelled_clean", False),
                                   getattr(args, "patient", "recording"))
    if unlabelled:
        print(f"streamer validate: {len(unlabelled)} patient(s) with flags but no labels left out: "
              f"{', '.join(unlabelled[:10])}{' ...' if len(unlabelled) > 10 else ''} (--unlabelled-clean counts "
              "them as clean)", file=sys.stderr)
    if df.empty:
        print("streamer validate: no flag matched a label (check patient ids and window_start_ns)")
        return 2
    threshold = float(df["threshold"].iloc[0]) if "threshold" in df else 0.20802117884159088
    table = metrics_table(df, threshold, args.bootstrap_samples, args.seed,
                          progress=not getattr(args, "quiet", False) and sys.stderr.isatty())
    kinds = kind_table(df, threshold, args.bootstrap_samples, args.seed)
    method = bootstrap_method(df["patient_id"].to_numpy())
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    plots = _plots(df, threshold, report.parent, report.stem)
    lines = ["# Validation report", "",
             f"Flags: `{' '.join(sources)}`; labels: `{args.labels}`; "
             f"model: `{df['model'].iloc[0] if 'model' in df else '?'}`; "
             f"threshold {threshold:.6f}; {len(df)} labelled windows of {df['patient_id'].nunique()} patient(s); "
             f"95 % percentile intervals from {args.bootstrap_samples} bootstrap resamples, {method}.", ""]
    if unlabelled:
        lines += [f"Left out, flags without any label ({len(unlabelled)}): {', '.join(unlabelled)}.", ""]
    elif getattr(args, "unlabelled_clean", False):
        lines += ["Patients without labels are counted as clean (--unlabelled-clean).", ""]
    lines += ["## Metrics", ""]
    cols = ["group", "windows", "artifact_share", "tp", "fp", "tn", "fn", "sensitivity", "sensitivity_ci",
            "specificity", "specificity_ci", "ppv", "npv", "accuracy", "auroc", "auroc_ci", "auprc"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    if kinds is not None and len(kinds):
        lines += ["", "## Sensitivity per artifact kind", "", "| kind | artifact_windows | patients | sensitivity | "
                  "sensitivity_ci |", "|---|---|---|---|---|"]
        lines += [f"| {r.kind} | {r.artifact_windows} | {r.patients} | {r.sensitivity:.3f} | {r.sensitivity_ci} |"
                  for r in kinds.itertuples()]
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    if args.offline:
        par = parity(flags, args.offline, threshold)
        lines += ["## Stream vs offline parity", "", *[f"- {k}: {_fmt(v)}" for k, v in par.items()], ""]
    try:
        tune = retune(df, args.target_sensitivity, args.target_specificity, args.bootstrap_samples, args.seed)
    except ValueError as exc:
        print(f"streamer validate: cannot retune the threshold: {exc}")
        return 2
    if tune:
        lo, hi = tune["threshold_ci"]
        lines += ["## Retuned threshold", "",
                  f"For {tune['target']}: threshold **{tune['threshold']:.6f}** (95 % CI {lo:.6f} - {hi:.6f}); "
                  f"on these windows sensitivity {tune['sensitivity']:.3f}, specificity {tune['specificity']:.3f}.", ""]
        if args.config_out:
            Path(args.config_out).write_text(
                f"# streamer validate: {tune['target']} on {len(df)} windows of {args.labels}\n"
                f"[model]\nthreshold = {tune['threshold']!r}\n")
            lines += [f"Config snippet written to `{args.config_out}` (use it as STREAMER_CONFIG or merge it).", ""]
    if rec is not None:
        pid = df["patient_id"].iloc[0]
        strip = report.parent / f"{report.stem}-strip.png"
        strip_plot(rec.times_ns, rec.values, df[df["patient_id"] == pid], threshold, strip)
        lines += ["## ECG strip", "", f"![{strip.name}]({strip.name})", ""]
    report.write_text("\n".join(lines) + "\n")
    overall = table.iloc[0]
    print(f"{len(df)} windows: sensitivity {overall['sensitivity']:.3f} {overall['sensitivity_ci']}, "
          f"specificity {overall['specificity']:.3f} {overall['specificity_ci']}, AU-ROC {overall['auroc']:.3f} "
          f"{overall['auroc_ci']}, AU-PR {overall['auprc']:.3f} -> {report}")
    if tune:
        print(f"retuned threshold for {tune['target']}: {tune['threshold']:.6f}")
    return 0
