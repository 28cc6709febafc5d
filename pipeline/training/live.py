"""Per-epoch training curves for `dvc plots`, written with dvclive.

`drct train --live DIR` passes `EpochLogger(DIR)` as the trainer's `on_epoch` hook. Each fold gets
its own series (``fold<k>/loss``, ``fold<k>/val_macro_f1``, ``fold<k>/val_macro_auc``) with the
epoch as the step, so DIR/plots/metrics/fold<k>/*.tsv hold one curve per fold; DIR/metrics.json
(a DVC metrics file) holds only the epochs and the fold mean of the last epoch's values, so that
`dvc exp show` is not flooded with per-fold columns. DIR/dvc.yaml is not written: the pipeline's dvc.yaml declares the
plots, and no DVC experiment is created from here (``dvc exp run`` already makes one).
"""

from __future__ import annotations

import math
from pathlib import Path

LOGGED = ("loss", "val_macro_f1", "val_macro_auc")


class EpochLogger:
    """Callable `(fold, epoch, record)`: logs LOGGED values of the record; `close()` writes the summary."""

    def __init__(self, out_dir: str | Path):
        from dvclive import Live

        self.live = Live(str(out_dir), dvcyaml=None, save_dvc_exp=False, report=None)

    def __call__(self, fold: int, epoch: int, record: dict) -> None:
        self.live.step = int(epoch)
        for key in LOGGED:
            value = record.get(key)
            if value is not None and math.isfinite(float(value)):
                self.live.log_metric(f"fold{fold}/{key}", float(value))

    def close(self) -> None:
        self.live.make_summary()
        self.live.end()
        self.write_summary()

    def write_summary(self) -> None:
        """Replace dvclive's summary (every fold's last value: 3 columns per fold in `dvc exp show`)
        by four numbers: the epochs and the mean over folds of the last epoch's LOGGED values. The
        per-fold curves stay in DIR/plots; `drct evaluate` prints each fold's summary."""
        import json

        path = Path(self.live.dir) / "metrics.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        folds = [v for k, v in summary.items() if k.startswith("fold") and isinstance(v, dict)]
        compact = {"epochs": summary.get("step")}
        for key in LOGGED:
            values = [float(f[key]) for f in folds if f.get(key) is not None]
            compact[f"last_{key}_fold_mean"] = sum(values) / len(values) if values else None
        path.write_text(json.dumps(compact, indent=1))
