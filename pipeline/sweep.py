"""The Fig. 6 m_key sweep's shared pieces: the configs of its points and the macro-F1 of a point.

Used by both commands that run the sweep, `drct sweep` (stages/sweep.py, its own DVC stage) and
`drct interpret --train-sweep` (stages/interpret.py), so that neither command imports the other.
"""

from __future__ import annotations

import copy

import numpy as np


def macro_f1(labels: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """The pooled out-of-fold macro-F1, by `pipeline.metrics` (the same number and name as
    metrics.json's ``macro_f1``)."""
    from pipeline.metrics import classification_metrics

    labels = np.asarray(labels, np.float64)
    names = [str(j) for j in range(labels.shape[1])]
    return classification_metrics(labels, np.asarray(prob, np.float64), names, threshold)["macro_f1"]


def sweep_configs(config: dict, m_keys: list[int], epochs: int | None, selections=("attention", "random")):
    """(m_key, selection, config) for every point of the sweep: the given config at that m_key and
    APS selection (and `epochs`, when given). Shared by `drct sweep` and `drct interpret --train-sweep`."""
    for m_key in m_keys:
        for selection in selections:
            cfg = copy.deepcopy(config)
            cfg["model"]["m_key"] = int(m_key)
            cfg["model"]["aps_selection"] = selection
            if epochs:
                cfg["train"]["epochs"] = int(epochs)
            yield int(m_key), selection, cfg
