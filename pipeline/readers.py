"""CQ500 readers: the model against each radiologist's own read, and the readers against each other.

CQ500's ``reads.csv`` holds three independent reads (R1, R2, R3) per patient; the training label
is their majority (`pipeline.data.cq500.read_cq500_reads`). A model trained on the majority is
also scored here against each reader's own read, and the readers' agreement with each other is
the reference ceiling: a model that agrees with a reader as well as another reader does has
reached what the labels can show.

* ``cohen``: per class, Cohen's kappa of each pair of readers (scikit-learn's ``cohen_kappa_score``)
  and of the model's calls (at the threshold) with each reader.
* ``fleiss``: per class, Fleiss' kappa of the three readers (Fleiss 1971):
  P_i = (sum_j n_ij^2 - r) / (r (r - 1)) per patient (n_ij readers saying j of r), P = mean P_i,
  p_j = share of all reads saying j, P_e = sum_j p_j^2, kappa = (P - P_e) / (1 - P_e); patients
  with a blank read for the class are left out of it; NaN when P_e = 1 (every read the same).
* Majority as in training: positive when more than half of the readers who answered say 1.

A run's scans are matched to reads.csv rows by patient: the run's ``patient_id`` is the CQ500
name (``dataset.keep_ids``) or its keyed pseudonym (the key beside the data, or ``--pseudonym-key``).
Every scan of a patient carries that patient's reads.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from pipeline.data.cq500 import READERS, majority_vote, patient_name, read_reader_votes
from pipeline.data.labels import CQ500_LABELS
from pipeline.metrics import classification_metrics


def read_reader_labels(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(names, {R1: (n, 9), R2: ..., R3: ...}): each reader's 0/1 read of the nine `CQ500_LABELS`
    per patient (``CQ500-CT-<n>``, in file order); a blank cell is NaN."""
    names, votes = read_reader_votes(path)
    return names, {r: votes[:, k, :] for k, r in enumerate(READERS)}


def majority(reads: dict[str, np.ndarray]) -> np.ndarray:
    """(n, C) majority label: 1 when more than half of the readers who answered say 1 (0 if none answered)."""
    return majority_vote(np.stack(list(reads.values()), axis=1))


def fleiss_kappa(ratings: np.ndarray) -> float:
    """Fleiss' kappa of (subjects, raters) categorical ratings; subjects with a NaN rating are left out."""
    ratings = np.asarray(ratings, np.float64)
    ratings = ratings[~np.isnan(ratings).any(1)]
    if len(ratings) == 0 or ratings.shape[1] < 2:
        return float("nan")
    raters = ratings.shape[1]
    categories = np.unique(ratings)
    counts = np.stack([(ratings == c).sum(1) for c in categories], 1).astype(np.float64)  # n_ij
    p_i = ((counts ** 2).sum(1) - raters) / (raters * (raters - 1))
    p_j = counts.sum(0) / counts.sum()
    p_e = float((p_j ** 2).sum())
    if p_e >= 1.0:
        return float("nan")
    return float((p_i.mean() - p_e) / (1.0 - p_e))


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa (scikit-learn) of two 0/1 reads over the rows where both are known; NaN when
    undefined (both constant and equal)."""
    import warnings

    from sklearn.metrics import cohen_kappa_score

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    known = ~np.isnan(a) & ~np.isnan(b)
    if not known.any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined (one value in both reads): NaN, said in the docstring
        value = cohen_kappa_score(a[known].astype(int), b[known].astype(int), labels=[0, 1])
    return float(value)


def reader_agreement(reads: dict[str, np.ndarray], class_names=CQ500_LABELS) -> dict:
    """Per class: Cohen's kappa of each reader pair and Fleiss' kappa of all readers; their means over classes."""
    per_class = {}
    for c, name in enumerate(class_names):
        pairs = {f"{a}-{b}": cohen_kappa(reads[a][:, c], reads[b][:, c]) for a, b in combinations(reads, 2)}
        per_class[name] = {"cohen": pairs, "fleiss": fleiss_kappa(np.stack([reads[r][:, c] for r in reads], 1))}
    fleiss = [v["fleiss"] for v in per_class.values() if np.isfinite(v["fleiss"])]
    pairs = [k for v in per_class.values() for k in v["cohen"].values() if np.isfinite(k)]
    return {"per_class": per_class, "mean_fleiss": float(np.mean(fleiss)) if fleiss else float("nan"),
            "mean_pairwise_cohen": float(np.mean(pairs)) if pairs else float("nan")}


def match_patients(run_patients, names, key: bytes | None) -> np.ndarray:
    """For each run scan, its row in reads.csv (-1 if none): the patient id is the CQ500 name itself,
    or its pseudonym under `key`."""
    row_of = {name: i for i, name in enumerate(names)}
    if key is not None:
        from pipeline.pseudonym import pseudonym

        row_of.update({pseudonym(key, "patient", name): i for i, name in enumerate(names)})
    out = []
    for pid in map(str, run_patients):
        canonical = patient_name(pid) if pid.upper().startswith("CQ500") else None
        out.append(row_of.get(canonical or pid, -1))
    return np.asarray(out, np.int64)


def score_against_readers(prob: np.ndarray, reads: dict[str, np.ndarray], threshold, class_names=CQ500_LABELS) -> dict:
    """Every figure of `classification_metrics` of (n, C) probabilities against each reader's read
    and the majority, the model's Cohen's kappa with each, and the readers' agreement (the ceiling)."""
    prob = np.asarray(prob, np.float64)
    references = {**reads, "majority": majority(reads)}
    called = (prob >= np.asarray(threshold, np.float64)).astype(np.float64)
    out = {"n": len(prob), "references": {}, "agreement": reader_agreement(reads, class_names)}
    for ref, labels in references.items():
        m = classification_metrics(labels, prob, list(class_names), threshold)
        kappas = {name: cohen_kappa(called[:, c], labels[:, c]) for c, name in enumerate(class_names)}
        finite = [k for k in kappas.values() if np.isfinite(k)]
        m["model_cohen"] = kappas
        m["mean_model_cohen"] = float(np.mean(finite)) if finite else float("nan")
        out["references"][ref] = m
    return out


def reader_evaluation(run, reads_path: str | Path, threshold, key_file: str | Path | None = None) -> dict:
    """`score_against_readers` for a run (`pipeline.evaluation.RunPredictions`) of CQ500 scans."""
    names, reads = read_reader_labels(reads_path)
    if list(run.names) != list(CQ500_LABELS):
        raise ValueError(f"--reads needs a CQ500 run (classes {', '.join(CQ500_LABELS)}); this run has {', '.join(run.names)}")
    key = None
    key_path = Path(key_file) if key_file else Path(reads_path).parent / ".drct_pseudonym_key"
    if key_path.is_file():
        from pipeline.pseudonym import load_or_create_key

        key = load_or_create_key(key_path)
    rows = match_patients(run.patient_id, names, key)
    found = rows >= 0
    if not found.any():
        raise ValueError(f"no scan of the run matches a patient of {reads_path}: pseudonymised ids need the key "
                         f"(--pseudonym-key; looked for {key_path})")
    matched = {r: table[rows[found]] for r, table in reads.items()}
    threshold = np.asarray(threshold, np.float64)
    result = score_against_readers(run.prob[found], matched, threshold if threshold.ndim < 2 else threshold[found])
    result["scans_without_reads"] = int((~found).sum())
    return result


def format_readers(result: dict) -> str:
    def f(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"

    agreement = result["agreement"]
    lines = [f"readers ({result['n']} scans; {result['scans_without_reads']} without reads): model against each read",
             f"{'reference':10s} {'macro_f1':>9s} {'macro_auc':>9s} {'kappa(model)':>13s}"]
    for ref, m in result["references"].items():
        lines.append(f"{ref:10s} {f(m['macro_f1']):>9s} {f(m['macro_auc']):>9s} {f(m['mean_model_cohen']):>13s}")
    lines.append(f"ceiling, readers with each other: mean pairwise Cohen's kappa {f(agreement['mean_pairwise_cohen'])}, "
                 f"mean Fleiss' kappa {f(agreement['mean_fleiss'])}")
    return "\n".join(lines)
