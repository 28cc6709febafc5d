"""Do the heads learn what simple baselines learn? The planted family benchmark (issue 15).

The family lives outside the project (`../shared/benchmarks/planted_family.py`, never copied or
edited here): seven members that hide a known lesion signal in VGG16-like slice vectors in seven
ways (its --help says how). This script builds each member at CQ500 scale (1,200 scans, 1-3 per
patient) by running that script, then trains every model with `run_training`, the code
`drct train` runs, on patient-grouped folds of the same split:

    pooled_logistic, meanpool, abmil   the baselines (model.name)
    drct1, drct2                       the project defaults
    drct2_paper                        the paper's DrCT2 (pipeline/presets.py)

and writes a member x model table: pooled out-of-fold macro-AUC with a patient-level bootstrap
95 % CI (2,000 resamples), macro-F1 at 0.5, Algorithm 1 comprehensive key-slice accuracy and
training time, plus the issue's targets, met or not. Every (scans, member, model, fold) cell is
its own run directory: a rerun skips finished cells, so the table can span sessions, and two
processes may share the work on disjoint --members.

    python bench/heads.py                                   # every member and model, folds 0-2
    python bench/heads.py --members weak,tiny --folds 0,1,2,3,4
    python bench/heads.py --models drct2 --members null     # one cell row
    python bench/heads.py --curve                           # + learning curve on weak (300/1200/4800)
    python bench/heads.py --table-only                      # the table from the cells done so far

Writes OUT/heads.json and OUT/heads.md (default OUT: bench/results/heads, gitignored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.store import FeatureCache
from pipeline.config import load_config
from pipeline.heads import registry
from pipeline.interpret import algorithm1, key_slice_mask, sampled_slice_labels
from pipeline.metrics import classification_metrics, macro_auc, patient_bootstrap_ci
from pipeline.presets import preset_overrides
from pipeline.training.trainer import run_training

FAMILY = ROOT.parent / "shared" / "benchmarks" / "planted_family.py"
MEMBERS = ("weak", "distributed", "majority", "heterogeneous", "tiny", "heavy", "null")
# every registered head (pipeline/heads/registry.py), baselines first, then the paper's preset
BASELINE_MODELS = tuple(name for name in registry.names() if registry.spec(name).baseline)
MODELS = BASELINE_MODELS + tuple(name for name in registry.names() if name not in BASELINE_MODELS) + ("drct2_paper",)
MODEL_SETTINGS = {name: {"model.name": name} for name in registry.names()}
MODEL_SETTINGS["drct2_paper"] = preset_overrides("drct2_paper")
KEY_SLICE_MEMBERS = ("weak", "heterogeneous", "tiny")
ATTENTION_MODELS = tuple(name for name in registry.names() if registry.spec(name).slice_attention) + ("drct2_paper",)


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    kinds = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ",".join(kinds) or "none of avx2/avx512/amx"


def member_cache(out: Path, member: str, scans: int, seed: int) -> Path:
    """The member's cache, built once by the family script (run, never copied)."""
    folder = out / "data" / f"scans{scans}_seed{seed}"
    path = folder / f"{member}.h5"
    if not path.exists():
        if not FAMILY.exists():
            sys.exit(f"error: the planted family is not at {FAMILY} (the shared folder beside the checkout)")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(FAMILY), str(folder), "--members", member, "--scans", str(scans),
                        "--seed", str(seed)], check=True)
    return path


def cell_config(cache_path: Path, model: str, fold: int, args) -> dict:
    settings = {"sampler.m": args.m, "model.m_key": args.m_key, "train.folds": args.k, "train.fold": fold,
                "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.seed": args.seed,
                "train.threads": args.threads, **MODEL_SETTINGS[model], **extra_settings(args.set)}
    config = load_config(None, settings)
    with FeatureCache(cache_path) as cache:  # the extraction settings of the cache, as `drct train` takes them
        for key in ("weights", "resolutions", "windows", "aps_source"):
            config["extract"][key] = cache.provenance[key]
    return config


def extra_settings(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs (YAML values) over every model's settings: an ablation of the whole
    table. Cells do not record them in their path, so give such a run its own --out."""
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def run_cell(out: Path, scans: int, member: str, model: str, fold: int, args) -> Path:
    cell = out / "cells" / f"scans{scans}" / member / model / f"fold_{fold}"
    if (cell / "cell.json").exists():
        return cell
    cache_path = member_cache(out, member, scans, args.seed)
    config = cell_config(cache_path, model, fold, args)
    start = time.perf_counter()
    run_training(config, cache_path, cell, progress=args.progress, log=lambda s: None)
    seconds = time.perf_counter() - start
    (cell / "cell.json").write_text(json.dumps({"seconds": seconds, "cpu": cpu_flags(), "epochs": args.epochs,
                                                 "settings": extra_settings(args.set)}))
    print(f"{member:13s} {model:15s} fold {fold} ({scans} scans): {seconds:6.1f} s", flush=True)
    return cell


def pooled_row(out: Path, scans: int, member: str, model: str, folds: list[int], seed: int) -> dict | None:
    """Pool the out-of-fold predictions of the finished folds of one (member, model)."""
    cells = [out / "cells" / f"scans{scans}" / member / model / f"fold_{k}" for k in folds]
    done = [c for c in cells if (c / "cell.json").exists()]
    if not done:
        return None
    oofs = [np.load(c / "oof.npz") for c in done]
    labels = np.concatenate([o["labels"] for o in oofs])
    prob = np.concatenate([o["prob"] for o in oofs])
    patients = np.concatenate([o["patient_id"] for o in oofs])
    auc, low, high = patient_bootstrap_ci(labels, prob, patients, macro_auc, resamples=2000, seed=seed)
    with FeatureCache(out / "data" / f"scans{scans}_seed{seed}" / f"{member}.h5") as cache:
        names = list(cache.label_names)
        table = cache.table
        index = np.concatenate([o["cache_index"] for o in oofs])
        sampled = sampled_slice_labels(table.slice_labels, table.offset[index],
                                       np.concatenate([o["sample_idx"] for o in oofs]))
    attention = np.concatenate([o["slice_attention"] for o in oofs])
    key = key_slice_mask(sampled)
    comprehensive = algorithm1(attention, key)["comprehensive"] if model in ATTENTION_MODELS else {"accuracy": None}
    chance = float(key[key.any(axis=1)].mean()) if key.any() else float("nan")
    metrics = classification_metrics(labels, prob, names)
    seconds = sum(json.loads((c / "cell.json").read_text())["seconds"] for c in done)
    return {"macro_auc": auc, "ci": [low, high], "macro_f1": metrics["macro_f1"],
            "comprehensive": comprehensive["accuracy"], "comprehensive_chance": chance,
            "seconds": seconds, "folds": [int(c.name.split("_")[1]) for c in done], "n_scans": len(labels)}


def targets(rows: dict) -> list[dict]:
    """The issue's targets on the finished rows: [{target, value, met}]."""
    checks = []
    for member, by_model in rows.items():
        if member == "null":
            for model, row in by_model.items():
                checks.append({"target": f"null: {model} macro-AUC within 0.50 +- 0.05",
                               "value": row["macro_auc"], "met": abs(row["macro_auc"] - 0.5) <= 0.05})
            continue
        baselines = {m: by_model[m]["macro_auc"] for m in BASELINE_MODELS if m in by_model}
        if "drct2" in by_model and baselines:
            best = max(baselines, key=baselines.get)
            value = by_model["drct2"]["macro_auc"]
            checks.append({"target": f"{member}: drct2 >= best baseline ({best} {baselines[best]:.3f}) - 0.02",
                           "value": value, "met": value >= baselines[best] - 0.02})
        if member == "tiny" and "drct2" in by_model and "drct1" in by_model:
            value = by_model["drct2"]["macro_auc"] - by_model["drct1"]["macro_auc"]
            checks.append({"target": "tiny: drct2 >= drct1 + 0.03", "value": value, "met": value >= 0.03})
        if member in KEY_SLICE_MEMBERS and "drct2" in by_model:
            value = by_model["drct2"]["comprehensive"]
            checks.append({"target": f"{member}: drct2 comprehensive key-slice accuracy >= 0.6",
                           "value": value, "met": value is not None and value >= 0.6})
    return checks


def markdown(result: dict) -> str:
    header = (f"CPU: {result['cpu']}; {result['scans']} scans per member, folds {result['folds']}, "
              f"{result['epochs']} epochs, m = {result['m']}, m_key = {result['m_key']}.")
    lines = [header, "",
             "| member | model | macro-AUC [95 % CI] | macro-F1 | comprehensive (chance) | train s | folds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for member, by_model in result["rows"].items():
        for model, r in by_model.items():
            flag = " (chance)" if r["ci"][0] <= 0.5 <= r["ci"][1] else ""
            comp = "n/a" if r["comprehensive"] is None else f"{r['comprehensive']:.3f}"
            lines.append(f"| {member} | {model} | {r['macro_auc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]{flag} | "
                         f"{r['macro_f1']:.3f} | {comp} ({r['comprehensive_chance']:.2f}) | {r['seconds']:.0f} | "
                         f"{','.join(map(str, r['folds']))} |")
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {t['target']} | {value} | {'yes' if t['met'] else '**no**'} |")
    if result.get("curve"):
        lines += ["", "Learning curve on weak (pooled macro-AUC [95 % CI]):", "", "| scans | model | macro-AUC |",
                  "| --- | --- | --- |"]
        for scans, by_model in result["curve"].items():
            for model, r in by_model.items():
                lines.append(f"| {scans} | {model} | {r['macro_auc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heads")
    ap.add_argument("--members", default=",".join(MEMBERS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--folds", default="0,1,2", help="folds of the 5-fold split to run (comma list)")
    ap.add_argument("--k", type=int, default=5, help="folds in the split")
    ap.add_argument("--scans", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=30, help="epochs of every SGD-trained model (paper: 100)")
    ap.add_argument("--m", type=int, default=28)
    ap.add_argument("--m-key", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--curve", action="store_true", help="also the learning curve on weak: 300, 1200, 4800 scans")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config setting over every model's (repeatable; use its own --out)")
    ap.add_argument("--table-only", action="store_true", help="only pool the cells already finished")
    ap.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    members = [m for m in args.members.split(",") if m]
    models = [m for m in args.models.split(",") if m]
    folds = [int(f) for f in args.folds.split(",") if f]
    for name in members:
        if name not in MEMBERS:
            sys.exit(f"error: unknown member '{name}'; choose from {', '.join(MEMBERS)}")
    for name in models:
        if name not in MODELS:
            sys.exit(f"error: unknown model '{name}'; choose from {', '.join(MODELS)}")
    out = args.out
    if not args.table_only:
        for member in members:
            for fold in folds:
                for model in models:
                    run_cell(out, args.scans, member, model, fold, args)
        if args.curve:
            for scans in (300, 1200, 4800):
                for model in ("drct2", "abmil"):
                    for fold in folds:
                        run_cell(out, scans, "weak", model, fold, args)
    rows = {}
    for member in MEMBERS:
        for model in MODELS:
            row = pooled_row(out, args.scans, member, model, folds, args.seed)
            if row is not None:
                rows.setdefault(member, {})[model] = row
    curve = {}
    for scans in (300, 1200, 4800):
        for model in ("drct2", "abmil"):
            row = pooled_row(out, scans, "weak", model, folds, args.seed) \
                if (out / "data" / f"scans{scans}_seed{args.seed}" / "weak.h5").exists() else None
            if row is not None:
                curve.setdefault(str(scans), {})[model] = row
    result = {"cpu": cpu_flags(), "scans": args.scans, "folds": folds, "epochs": args.epochs, "m": args.m,
              "m_key": args.m_key, "rows": rows, "targets": targets(rows), "curve": curve}
    out.mkdir(parents=True, exist_ok=True)
    (out / "heads.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "heads.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
