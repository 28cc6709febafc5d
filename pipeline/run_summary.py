"""The run summary printed at the end of `drct extract` and `drct train` (issue 17, item 6).

What a run did, in a few aligned lines and in ``summary.json``: scans done, skipped, rejected
by reason, wall time, rates and where the outputs are.

- **extract**: done = scans encoded into the cache by this run; skipped = scans already in the
  cache or its parts (a resumed or up-to-date run; a scan rejected by an earlier run counts
  here too); rejected = scans of this run none of whose slices could be decoded. The reasons
  are counted over the rejects file the run leaves (OUT's ``.rejects.csv``: the whole cache,
  index-time rejects included) by `reason_key`; ``note:`` rows (scans kept, with a remark) are
  counted apart. Rates: scans/s and slices/s over the command's wall time. The file is
  ``features.summary.json`` beside ``features.h5`` (`summary_path`, the rule of the rejects
  file: caches side by side never share one). It is not a DVC output: it changes on every run.
- **train**: done = scans predicted out of fold by the folds this run trained; skipped = those
  of folds kept from an interrupted run (resume); rejected = cache scans with an unknown label,
  which no fold uses. Rates: folds/s and samples/s (scan samples seen in training, summed over
  epochs). The file is ``RUN/summary.json`` (inside the run directory, a DVC output).

A summary is written only when the command succeeds; a stale one is removed when a run starts
(extract: here; train: `pipeline.training.rundir.RUN_FILES`), so none ever claims a success
that did not happen. Writing is atomic (a temporary file, then `os.replace`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUMMARY_FORMAT = "drct-run-summary"
SUMMARY = "summary.json"
NOTE = "note"


@dataclass
class Started:
    """When a command started (wall clock and a monotonic clock) and, for train, the identity of
    the fold histories already in RUN (so that folds kept by a resume are told from new ones)."""

    perf: float
    wall: float
    folds_before: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.perf


def start(run_dir: str | Path | None = None) -> Started:
    """Call when the command starts; `run_dir`: the train run directory."""
    return Started(time.perf_counter(), time.time(), _fold_histories(run_dir) if run_dir else {})


@dataclass
class RunSummary:
    command: str                     # "extract" | "train"
    scans: dict[str, int]            # done, skipped, rejected, and totals
    rejected_by_reason: dict[str, int]
    seconds: float                   # wall time of the command
    rates: dict[str, float]          # e.g. {"scans/s": ..., "slices/s": ...}
    outputs: dict[str, str]          # what -> path
    details: dict = field(default_factory=dict)
    notes: int = 0                   # extract: note rows of the rejects file (scans kept)
    status: str = "finished"
    finished: str = ""

    def to_dict(self) -> dict:
        content = {"format": SUMMARY_FORMAT, **asdict(self)}
        content["seconds"] = round(self.seconds, 3)
        content["rates"] = {unit: round(value, 4) for unit, value in self.rates.items()}
        return content

    def lines(self) -> list[str]:
        """The printed summary: a few aligned `label  value` lines."""
        s = self.scans
        scans = f"{s['done']} done, {s['skipped']} skipped, {s['rejected']} rejected"
        extra = [f"{s[k]} {k.replace('_', ' ')}" for k in s if k not in ("done", "skipped", "rejected")]
        rows = [("scans", scans + (f" ({', '.join(extra)})" if extra else ""))]
        if self.details.get("folds"):
            f = self.details["folds"]
            rows.append(("folds", f"{f['done']} trained, {f['skipped']} kept from the interrupted run, of {f['run']}"))
        if self.rejected_by_reason:
            reasons = sorted(self.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
            rows += [("rejects" if i == 0 else "", f"{n:>5}  {reason}") for i, (reason, n) in enumerate(reasons)]
        if self.notes:
            rows.append(("notes", f"{self.notes} (scans kept with a remark; see the rejects file)"))
        rate = ", ".join(f"{value:.2f} {unit}" for unit, value in self.rates.items())
        rows.append(("time", f"{self.seconds:.1f} s" + (f" ({rate})" if rate else "")))
        rows += [(name, path) for name, path in self.outputs.items()]
        width = max(len(label) for label, _ in rows)
        return [f"drct {self.command}: summary"] + [f"  {label:<{width}}  {value}" for label, value in rows]

    def write(self, path: str | Path) -> Path:
        """summary.json at `path`, atomically."""
        self.finished = self.finished or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return atomic_write_json(path, self.to_dict())

    def report(self, path: str | Path, echo: Callable[[str], None] | None) -> RunSummary:
        """Write summary.json to `path` (always), then print the lines with `echo` (None: quiet)."""
        self.outputs["summary"] = str(path)
        try:
            self.write(path)
        except OSError as exc:  # the run itself succeeded: say so, and that the file is missing
            self.outputs["summary"] = f"not written ({exc.strerror or exc})"
        if echo is not None:
            for line in self.lines():
                echo(line)
        return self


def atomic_write_json(path: str | Path, content: Mapping) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale(path: str | Path) -> None:
    """Remove the summary of an earlier run (called when a run starts). Best effort: an unusable
    output folder is the run's own error to report, with its own message."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


# -- rejects ----------------------------------------------------------------------------------
def reason_key(reason: str) -> str:
    """The kind of a reject reason: its text before the first colon or parenthesis, numbers
    replaced by '#' ("pixels not decodable: ..." -> "pixels not decodable", "duplicate slice
    position (5.000 mm, ...)" -> "duplicate slice position"); "note: ..." rows -> "note"."""
    text = reason.strip().lstrip("'")  # csv_safe's formula guard
    head = re.split(r":|\s\(", text, maxsplit=1)[0].strip()
    return re.sub(r"\d+(?:[.x]\d+)*", "#", head) or "unknown"


def rejects_by_reason(csv_path: str | Path | None) -> tuple[dict[str, int], int]:
    """({reason kind: rows}, note rows) of a rejects CSV; ({}, 0) when there is none."""
    if csv_path is None or not Path(csv_path).is_file():
        return {}, 0
    with open(csv_path, newline="", encoding="utf-8") as handle:
        counts = Counter(reason_key(row.get("reason") or "") for row in csv.DictReader(handle))
    notes = counts.pop(NOTE, 0)
    return dict(counts), notes


# -- extract ----------------------------------------------------------------------------------
def summary_path(cache: str | Path) -> Path:
    """``features.h5`` -> ``features.summary.json`` (other suffixes kept: ``c.hdf5.summary.json``)."""
    cache = Path(cache)
    return cache.with_name((cache.stem if cache.suffix == ".h5" else cache.name) + ".summary.json")


def extract_summary(result, started: Started) -> RunSummary:
    """The summary of a finished `run_extraction` (its `ExtractResult`)."""
    from cache.writer import rejects_path

    seconds = started.seconds
    csv_path = Path(result.rejects_csv) if result.rejects_csv else rejects_path(result.out)
    by_reason, notes = rejects_by_reason(csv_path)
    done, rejected = int(result.done_scans), int(result.rejected_scans)
    scans = {"done": done, "skipped": int(result.skipped_scans), "rejected": rejected,
             "in_cache": _cache_scans(result.out)}
    rates = {"scans/s": done / seconds, "slices/s": result.n_slices / seconds} if seconds > 0 else {}
    outputs = {"cache": str(result.out)}
    if csv_path.is_file():
        outputs["rejects file"] = str(csv_path)
    return RunSummary("extract", scans, by_reason, seconds, rates, outputs, notes=notes,
                      details={"slices_encoded": int(result.n_slices), "scans_indexed": done + rejected + int(result.skipped_scans),
                               "reject_rows": sum(by_reason.values()),
                               "up_to_date": bool(result.up_to_date), "where": result.where},
                      status="up to date" if result.up_to_date else "finished")


def report_extract(result, started: Started, echo: Callable[[str], None] | None) -> RunSummary:
    return extract_summary(result, started).report(summary_path(result.out), echo)


def _cache_scans(path) -> int:
    from cache.store import FeatureCache

    with FeatureCache(path) as cache:
        return len(cache)


# -- train ------------------------------------------------------------------------------------
def _fold_histories(run_dir: str | Path) -> dict[int, tuple[int, int, int]]:
    """{fold: (inode, mtime_ns, size)} of RUN/fold_<k>/history.json: a rewritten file (atomic
    replace) has a new identity, a fold kept by a resume the same."""
    found = {}
    for path in Path(run_dir).glob("fold_*/history.json"):
        try:
            st = path.stat()
            found[int(path.parent.name.split("_", 1)[1])] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            continue
    return found


def train_summary(info: dict, cache_path: str | Path, run_dir: str | Path, started: Started,
                  live_dir: str | Path | None = None) -> RunSummary:
    """The summary of a finished `run_training` (its run.json content `info`) in `run_dir`."""
    import numpy as np

    from cache.store import FeatureCache

    seconds = started.seconds
    run_dir = Path(run_dir)
    now = _fold_histories(run_dir)
    folds_run = [int(f) for f in info["folds_run"]]
    kept = [f for f in folds_run if f in started.folds_before and started.folds_before[f] == now.get(f)]
    trained = [f for f in folds_run if f not in kept]
    with np.load(run_dir / "oof.npz", allow_pickle=False) as oof:
        per_fold = Counter(int(f) for f in oof["fold"])
    with FeatureCache(cache_path) as cache:
        n_cache = len(cache)
    n_unlabelled = n_cache - int(info["n_scans"])
    samples = epochs = 0
    for f in trained:
        history = json.loads((run_dir / f"fold_{f}" / "history.json").read_text())
        samples += sum(int(record.get("samples", 0)) for record in history)
        epochs = max(epochs, len(history))
    scans = {"done": sum(per_fold[f] for f in trained), "skipped": sum(per_fold[f] for f in kept),
             "rejected": n_unlabelled, "in_cache": n_cache}
    rates = {"folds/s": len(trained) / seconds, "samples/s": samples / seconds} if seconds > 0 else {}
    outputs = {"run": str(run_dir), "run.json": str(run_dir / "run.json"), "oof": str(run_dir / "oof.npz"),
               "model card": str(run_dir / "MODEL_CARD.md")}
    outputs.update({f"fold {f}": str(run_dir / f"fold_{f}" / "checkpoint.pt") for f in folds_run})
    if live_dir:
        outputs["live"] = str(live_dir)
    return RunSummary("train", scans, {"unknown label": n_unlabelled} if n_unlabelled else {}, seconds, rates,
                      outputs, details={"model": info.get("model"), "cache": str(cache_path),
                                        "folds": {"run": len(folds_run), "done": len(trained), "skipped": len(kept),
                                                  "trained": trained, "kept": kept},
                                        "epochs": epochs, "samples": samples})


def report_train(info: dict, cache_path, run_dir, started: Started, echo: Callable[[str], None] | None,
                 live_dir=None) -> RunSummary:
    return train_summary(info, cache_path, run_dir, started, live_dir).report(Path(run_dir) / SUMMARY, echo)
