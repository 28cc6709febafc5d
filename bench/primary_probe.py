"""Does the primary network (DrCT1's PrimaryNetwork) learn on its own at one resolution? (issue 15)

A short loop around the project's `PrimaryNetwork` on one planted-family member, fold 0 of the same
patient-grouped 5-fold split as bench/heads.py, with the trainer's sampler, the scan-quantile input
norm and AdamW. Per few epochs it prints the training loss (MSE on the sigmoid outputs, as the
paper's primary loss), validation macro-AUC, how often the top-attended slice of a positive scan is
a lesion slice ("top1hit"), the lesion share among the 16 slices the APS would zoom in on against
the share among all 28 sampled ("top16 (base)") and the slice attention's effective count ("eff").

    python bench/primary_probe.py weak                                   # the default readout
    python bench/primary_probe.py weak --kw '{"fc_hidden": [256, 128]}'  # the paper's three FC layers
    python bench/primary_probe.py weak --he-init --kw '{"fc_hidden": [256, 128]}'

The member caches are the ones bench/heads.py builds (bench/results/heads/data/scans1200_seed0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.store import FeatureCache
from pipeline.heads.primary import PrimaryNetwork
from pipeline.training.folds import assign_folds
from pipeline.training.sampler import epoch_plan, eval_positions, sample_positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("member")
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "results" / "heads" / "data" / "scans1200_seed0")
    ap.add_argument("--kw", default="{}", help="PrimaryNetwork keyword arguments (JSON)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--loss", choices=("mse", "bce"), default="mse")
    ap.add_argument("--he-init", action="store_true", help="He-initialise the readout's FC layers")
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, quantile = 28, 0.2
    cache = FeatureCache(args.data / f"{args.member}.h5")
    t = cache.table
    labels = torch.tensor(t.labels, dtype=torch.float32)
    fold = assign_folds(t.patient_id, t.labels, 5, 0)
    train, val = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    features = torch.from_numpy(cache.load_all(args.resolution).astype(np.float32))
    lesion = torch.from_numpy((t.slice_labels > 0).any(1))
    model = PrimaryNetwork(t.labels.shape[1], m, **json.loads(args.kw))
    if model.standardize is not None:
        sample = features[torch.from_numpy(t.offset[train][:, None] + eval_positions(t.n_slices[train], m))]
        centred = sample - torch.quantile(sample, quantile, dim=1, keepdim=True)
        model.standardize.set_statistics(torch.zeros(sample.shape[-1]), centred.reshape(-1, sample.shape[-1]).std(0))
    if args.he_init:
        for layer in model.classifier:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(0)

    def rows(scans, positions):
        return torch.from_numpy(t.offset[scans][:, None] + positions)

    val_rows = rows(val, eval_positions(t.n_slices[val], m))
    positive = t.labels[val].max(1) > 0
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        which, phase = epoch_plan(t.n_slices[train], m, rng)
        order = rng.permutation(len(which))
        total = 0.0
        for b in range(0, len(order), 32):
            scans = train[which[order[b:b + 32]]]
            out = model(features[rows(scans, sample_positions(t.n_slices[scans], m, phase[order[b:b + 32]]))])
            loss = nn.functional.mse_loss(out["prob"], labels[scans]) if args.loss == "mse" else \
                nn.functional.binary_cross_entropy_with_logits(out["logits"], labels[scans])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(scans)
        if epoch % args.every and epoch != args.epochs:
            continue
        model.eval()
        with torch.no_grad():
            out = model(features[val_rows])
        prob, attention = out["prob"].numpy(), out["slice_attention"]
        auc = np.mean([roc_auc_score(t.labels[val, j], prob[:, j]) for j in range(prob.shape[1])])
        top1 = lesion[val_rows[torch.arange(len(val)), attention.argmax(1)]].numpy()
        top16 = lesion[torch.gather(val_rows, 1, torch.topk(attention, 16, 1).indices)].float().mean(1).numpy()
        base = lesion[val_rows].float().mean(1).numpy()
        w = attention.clamp_min(1e-12)
        eff = torch.exp(-(w * w.log()).sum(1)).mean().item()
        print(f"epoch {epoch} loss {total / len(order):.4f} auc {auc:.3f} top1hit {top1[positive].mean():.2f} "
              f"top16 {top16[positive].mean():.2f} (base {base[positive].mean():.2f}) eff {eff:.1f} "
              f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
