"""Planted-signal benchmark (issue 8): do the heads find the lesion slices where the truth is exact?

One run, on one planted cache (pipeline/synthetic/planted.py), with the paper's head settings
(configs/planted.yaml: learning rates, dropout, losses; no raised rates):

* DrCT2 vs DrCT1: pooled and per-fold macro AUC/F1, per class, paired t-test over folds;
* Algorithm 1 key-slice tasks (easy, difficult, comprehensive) on DrCT2's slice attention;
* Fig. 6: attention vs random APS selection, swept over m_key;
* Table 4: APS on the APS-resolution vectors vs on the primary-resolution ones;
* Table 2: BCE vs MSE;
* a plain baseline: logistic regression on max+mean pooled vectors of each resolution.

    python bench/planted.py --out bench/results/planted            # every fold, 100 epochs
    python bench/planted.py --folds-run 0,1 --epochs 40 --sweep 4,16 # a shorter run

Writes OUT/planted.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cache.store import FeatureCache
from pipeline.config import load_config
from pipeline.interpret import algorithm1, key_slice_mask, sampled_slice_labels
from pipeline.metrics import cross_validation_metrics, json_safe, paired_ttest
from pipeline.synthetic.planted import PlantedSpec, write_planted_cache
from pipeline.training.folds import assign_folds
from pipeline.training.trainer import run_training

ROOT = Path(__file__).resolve().parent.parent


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return platform.processor()
    return ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def logistic_baseline(cache: FeatureCache, fold: np.ndarray, folds_run: list[int]) -> dict:
    """Logistic regression per class on [max, mean] pooled slice vectors, out of fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    table = cache.table
    names = list(cache.label_names)
    out = {}
    for res in cache.resolutions:
        vectors = cache.load_all(res).astype(np.float32)
        pooled = np.stack([np.concatenate([vectors[o:o + n].max(0), vectors[o:o + n].mean(0)])
                           for o, n in zip(table.offset, table.n_slices)])
        rows = np.isin(fold, folds_run)
        prob = np.zeros((len(pooled), len(names)))
        for k in folds_run:
            train, val = fold != k, fold == k
            scaler = StandardScaler().fit(pooled[train])
            for c in range(len(names)):
                model = LogisticRegression(C=0.05, max_iter=3000).fit(scaler.transform(pooled[train]), table.labels[train, c])
                prob[val, c] = model.predict_proba(scaler.transform(pooled[val]))[:, 1]
        out[int(res)] = cross_validation_metrics(table.labels[rows], prob[rows], fold[rows], names)
    return out


def run(config: dict, cache_path: Path, out: Path, label: str, overrides: dict, log) -> dict:
    """Train one variant on the configured folds, return its metrics and Algorithm 1 accuracies."""
    cfg = copy.deepcopy(config)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    start = time.perf_counter()
    run_training(cfg, cache_path, out / label, progress=False, log=lambda s: None)
    seconds = time.perf_counter() - start
    oof = np.load(out / label / "oof.npz")
    cache = FeatureCache(cache_path)
    names = list(cache.label_names)
    metrics = cross_validation_metrics(oof["labels"], oof["prob"], oof["fold"], names)
    sampled = sampled_slice_labels(cache.table.slice_labels, cache.table.offset[oof["cache_index"]], oof["sample_idx"])
    tasks = algorithm1(oof["slice_attention"], key_slice_mask(sampled))
    result = {"label": label, "overrides": overrides, "seconds": round(seconds, 1), "metrics": metrics,
              "algorithm1": tasks}
    log(f"{label:28s} macro-AUC {metrics['macro_auc']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
        f"comprehensive {tasks['comprehensive']['accuracy'] or 0:.3f}  ({seconds:.0f} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "planted.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planted"))
    parser.add_argument("--scans", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted cache")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--folds-run", default="all", help="'all' or a comma list of folds, e.g. 0,1")
    parser.add_argument("--sweep", default="4,8,16", help="m_key values of the Fig. 6 sweep ('' to skip)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(args.config, {"train.epochs": args.epochs} if args.epochs else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path, _truth = write_planted_cache(out / "planted.h5", config, PlantedSpec(n_scans=args.scans, seed=args.seed))
    cache = FeatureCache(cache_path)
    k = int(config["train"]["folds"])
    folds_run = list(range(k)) if args.folds_run == "all" else [int(f) for f in args.folds_run.split(",")]
    fold = assign_folds(cache.table.patient_id, cache.table.labels, k, int(config["train"]["seed"]))
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"planted cache: {args.scans} scans, {k} folds (run {folds_run}), {config['train']['epochs']} epochs, "
        f"m={config['sampler']['m']}, m_key={config['model']['m_key']}; CPU flags {cpu_flags()}; torch threads "
        f"{torch.get_num_threads()}")
    started = time.perf_counter()
    results: dict = {"baseline": logistic_baseline(cache, fold, folds_run)}
    for res, metrics in results["baseline"].items():
        log(f"{'logistic regression @' + str(res):28s} macro-AUC {metrics['macro_auc']:.3f}  macro-F1 {metrics['macro_f1']:.3f}")
    variants = {"drct2": {}, "drct1": {"model.name": "drct1"}}
    tail = {"drct2_aps_first": {"model.aps_resolution": "first"}, "drct2_bce": {"train.loss": "bce"}}
    m = int(config["sampler"]["m"])
    for m_key in [int(v) for v in args.sweep.split(",") if v.strip()]:
        if m_key == int(config["model"]["m_key"]):  # the attention run at this m_key is "drct2" itself
            variants[f"drct2_random_mkey{m_key}"] = {"model.aps_selection": "random"}
        elif m_key <= m:
            variants[f"drct2_mkey{m_key}"] = {"model.m_key": m_key}
            variants[f"drct2_random_mkey{m_key}"] = {"model.m_key": m_key, "model.aps_selection": "random"}
    variants.update(tail)  # the claims first: a cut-short run still has DrCT2 vs DrCT1 and Fig. 6
    every_fold = folds_run == list(range(k))
    for label, overrides in variants.items():
        if every_fold:
            results[label] = run(config, cache_path, out, label, overrides, log)
        else:
            results[label] = run_folds(config, cache_path, out, label, overrides, folds_run, log)
        (out / "planted.json").write_text(json.dumps(json_safe(results), indent=1))  # partial results survive
    if len(folds_run) >= 2:
        for a, b in (("drct2", "drct1"), ("drct2", "drct2_aps_first"), ("drct2_bce", "drct2")):
            for key in ("macro_auc", "macro_f1"):
                test = paired_ttest(results[a]["metrics"], results[b]["metrics"], key)
                results.setdefault("paired_tests", {})[f"{a}-vs-{b}:{key}"] = test
                log(f"paired t-test {a} vs {b} on {key}: mean difference {test['mean_difference']:+.3f}, "
                    f"p = {test['pvalue']:.3g}")
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["settings"] = {"scans": args.scans, "folds": k, "folds_run": folds_run, "epochs": config["train"]["epochs"],
                           "cpu_flags": cpu_flags(), "config": args.config}
    (out / "planted.json").write_text(json.dumps(json_safe(results), indent=1))
    (out / "planted.log").write_text("\n".join(lines) + "\n")
    log(f"total {results['seconds']:.0f} s; results in {out / 'planted.json'}")


def run_folds(config, cache_path, out, label, overrides, folds_run, log) -> dict:
    """Several (not all) folds: one training per fold, out-of-fold predictions merged."""
    parts = []
    for k in folds_run:
        parts.append(run(config, cache_path, out, f"{label}/fold{k}", {**overrides, "train.fold": k}, lambda s: None))
    oofs = [np.load(out / f"{label}/fold{k}" / "oof.npz") for k in folds_run]
    cache = FeatureCache(cache_path)
    names = list(cache.label_names)
    labels = np.concatenate([o["labels"] for o in oofs])
    prob = np.concatenate([o["prob"] for o in oofs])
    fold = np.concatenate([o["fold"] for o in oofs])
    attention = np.concatenate([o["slice_attention"] for o in oofs])
    sampled = np.concatenate([sampled_slice_labels(cache.table.slice_labels, cache.table.offset[o["cache_index"]],
                                                   o["sample_idx"]) for o in oofs])
    metrics = cross_validation_metrics(labels, prob, fold, names)
    tasks = algorithm1(attention, key_slice_mask(sampled))
    seconds = sum(p["seconds"] for p in parts)
    log(f"{label:28s} macro-AUC {metrics['macro_auc']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
        f"comprehensive {tasks['comprehensive']['accuracy'] or 0:.3f}  ({seconds:.0f} s)")
    return {"label": label, "overrides": overrides, "seconds": seconds, "metrics": metrics, "algorithm1": tasks}


if __name__ == "__main__":
    main()
