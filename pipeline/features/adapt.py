"""`drct adapt`: a lesion-aware encoder, fine-tuned on slice labels of a *separate* set of scans.

Random (and, for small bleeds, ImageNet) VGG16 vectors do not separate lesion slices from
normal ones, so no head can learn from them. The strongest RSNA solutions tune the CNN on slice
labels and then train a sequence model on its cached embeddings; this is that step, kept apart
from DrCT2's frozen stage one:

1. blocks 1-4 of VGG16 stay frozen at the configured weights (imagenet, a file, random:SEED);
   their maps at the primary resolution are computed once per slice and cached on disk, so an
   epoch on a CPU costs block 5 only;
2. block 5 (three 3x3 convs + ReLU) and a linear slice classifier on its global max-pooled
   vector (the very vector stage one stores) are trained with BCE on the slice labels;
3. the result is written as a plain VGG16 state dict (``features.N.weight``/``bias``) that
   ``--weights FILE`` accepts, plus ``FILE.json`` saying what it was adapted from: source spec
   and digest, data, layout, epochs, the scans used. Stage one stays frozen with these weights
   and records the sidecar in the cache's provenance (``adaptation``); `drct train` refuses a
   cache whose own scans overlap the adaptation scans.

Resumable per epoch: ``FILE.work/`` keeps the block-4 maps and a checkpoint after every epoch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cache.provenance import sop_digest
from pipeline.features.encoder import VGG16Encoder, load_encoder, weights_digest
from pipeline.features.preprocess import model_input, window_and_resize
from pipeline.weights_only import load_weights_only

BLOCK5_START = 24  # torchvision VGG16 "D": modules 0-23 are blocks 1-4 (incl. the 4th max pool)


class AdaptError(ValueError):
    """Adaptation that cannot run (no slice labels, no data); the message says why."""


def sidecar_path(weights_path: str | Path) -> Path:
    return Path(str(weights_path) + ".json")


def adaptation_record(weights_spec: str) -> dict | None:
    """The sidecar of an adapted weights file (None for imagenet, random:SEED or a plain file)."""
    path = sidecar_path(Path(weights_spec).expanduser())
    if weights_spec in ("imagenet",) or weights_spec.startswith("random:") or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class SliceClassifier(nn.Module):
    """Block 5 of VGG16 + global max pool + Linear(512, C): what `drct adapt` trains."""

    def __init__(self, encoder: VGG16Encoder, n_classes: int):
        super().__init__()
        self.block5 = nn.Sequential(*[module for module in list(encoder.features)[BLOCK5_START:]])
        self.block5.requires_grad_(True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(512, n_classes)

    def forward(self, block4_maps: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.block5(block4_maps)), 1))


def labelled_slices(index) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """(paths, slice labels (n, C), scan id and SOP UID of each slice) of every slice with slice labels."""
    paths, labels, scans, sops = [], [], [], []
    for scan in index.scans:
        for ref in scan.slices:
            if ref.labels is not None and len(ref.labels) == len(index.label_names):
                paths.append(ref.path)
                labels.append(ref.labels)
                scans.append(scan.scan_id)
                sops.append(ref.sop_uid)
    if not paths:
        raise AdaptError(
            f"no slice-level labels in {index.root} (layout {index.layout}): `drct adapt` needs a dataset "
            "with slice labels (RSNA's stage_2_train.csv, or a phantom)"
        )
    return paths, np.asarray(labels, np.float32), scans, sops


@torch.no_grad()
def block4_maps(encoder: VGG16Encoder, paths: list[str], resolution: int, windows, batch_size: int,
                store: Path, progress: bool) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Frozen blocks 1-4 of every slice at `resolution`, cached as float16 in `store` (reused
    when complete). Returns (maps memmap (n_ok, 512, r/16, r/16), kept slice numbers, errors)."""
    from pipeline.data.dicom_io import read_hu

    side = resolution // 16
    done = store / "block4.done.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("resolution") == resolution and info.get("n_paths") == len(paths):
            maps = np.load(store / "block4.npy", mmap_mode="r")
            return maps, info["kept"], [tuple(e) for e in info["errors"]]
    trunk = nn.Sequential(*list(encoder.features)[:BLOCK5_START]).eval()
    kept, errors, images = [], [], []
    out = np.lib.format.open_memmap(store / "block4.npy", mode="w+", dtype=np.float16,
                                    shape=(len(paths), 512, side, side))
    n_ok = 0
    bar = tqdm(total=len(paths), desc="adapt: blocks 1-4 (once)", unit="slice", disable=not progress)

    def flush() -> None:
        nonlocal n_ok, images
        if images:
            batch = model_input({resolution: torch.stack(images)}, resolution, [resolution], "upsampled")
            out[n_ok:n_ok + len(images)] = trunk(batch).numpy().astype(np.float16)
            n_ok += len(images)
            images = []

    for number, path in enumerate(paths):
        try:
            windowed = window_and_resize(read_hu(path), [resolution], windows, "upsampled")[resolution]
        except Exception as exc:  # noqa: BLE001 - a bad slice is left out, with its reason
            errors.append((path, f"{type(exc).__name__}: {exc}"))
            bar.update(1)
            continue
        kept.append(number)
        images.append(windowed.float())
        if len(images) == batch_size:
            flush()
        bar.update(1)
    flush()
    bar.close()
    out.flush()
    done.write_text(json.dumps({"resolution": resolution, "n_paths": len(paths), "kept": kept, "errors": errors}))
    return np.load(store / "block4.npy", mmap_mode="r")[:n_ok], kept, errors


def adapt_encoder(
    config: dict,
    index,
    out_path: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune block 5 on `index`'s slice labels and write the adapted VGG16; returns the record."""
    ad = config["adapt"]
    ex = config["extract"]
    resolution = int(ex["resolutions"][0])
    epochs, seed = int(ad["epochs"]), int(ad["seed"])
    batch_size, lr = int(ad["batch_size"]), float(ad["lr"])
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise AdaptError(f"adapt.epochs ({epochs}) and adapt.batch_size ({batch_size}) must be >= 1, adapt.lr > 0")
    out_path = Path(out_path)
    work = Path(str(out_path) + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder, source_digest = load_encoder(str(ex["weights"]))
    paths, labels, slice_scans, slice_sops = labelled_slices(index)
    maps, kept, errors = block4_maps(encoder, paths, resolution, ex["windows"], int(ex["batch_size"]), work, progress)
    labels = labels[kept]
    if len(labels) == 0:
        raise AdaptError("no slice could be decoded for adaptation: " + "; ".join(e[1] for e in errors[:3]))

    model = SliceClassifier(encoder, labels.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    positives = labels.sum(0)
    pos_weight = torch.from_numpy(((len(labels) - positives) / np.maximum(positives, 1)).clip(1, 50)).float()
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    start_epoch, history = 0, []
    checkpoint = work / "checkpoint.pt"
    if checkpoint.is_file():
        resume = f"{checkpoint}, the resume file of an interrupted `drct adapt`,"
        state = load_weights_only(checkpoint, AdaptError, f"{resume} cannot be read: delete it to start over",
                                  refused=f"{resume} holds Python objects besides tensors and is refused (never "
                                          "unpickled): delete it to start over")
        if isinstance(state, dict) and state.get("source_digest") == source_digest and state.get("n") == len(labels):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history = int(state["epoch"]), json.loads(state["history"])
            log(f"adapt: resuming after epoch {start_epoch} of {epochs}")
    rng = np.random.default_rng([seed, start_epoch])
    targets = torch.from_numpy(labels)
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        order = rng.permutation(len(labels))
        total, began = 0.0, time.perf_counter()
        bar = tqdm(total=len(order), desc=f"adapt: epoch {epoch}/{epochs}", unit="slice", disable=not progress)
        for first in range(0, len(order), batch_size):
            rows = np.sort(order[first:first + batch_size])
            x = torch.from_numpy(np.asarray(maps[rows], np.float32))
            loss = loss_fn(model(x), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{total / min(first + batch_size, len(order)):.4f}", refresh=False)
        bar.close()
        history.append({"epoch": epoch, "loss": total / len(order), "seconds": time.perf_counter() - began})
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "history": json.dumps(history), "source_digest": source_digest, "n": len(labels)},
                   checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)
        log(f"adapt: epoch {epoch}/{epochs} loss {history[-1]['loss']:.4f}")

    # the adapted VGG16: blocks 1-4 as they were, block 5 as trained
    trunk = encoder.features.state_dict()
    for key, value in model.block5.state_dict().items():
        number, name = key.split(".", 1)
        trunk[f"{int(number) + BLOCK5_START}.{name}"] = value.detach().clone()
    adapted = VGG16Encoder()
    adapted.features.load_state_dict(trunk)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save({f"features.{k}": v.float() for k, v in adapted.features.state_dict().items()}, tmp)
    tmp.replace(out_path)
    scan_ids = sorted({slice_scans[i] for i in kept})
    sop_uids = [slice_sops[i] for i in kept]
    dataset = config.get("dataset") or {}
    if not dataset.get("keep_ids", False):  # as stage one stores them: keyed pseudonyms, so no PatientID
        from pipeline.pseudonym import (  # leaks and overlaps still match
            key_path,
            load_or_create_key,
            pseudonym,
        )

        key = load_or_create_key(key_path(index.root, dataset.get("pseudonym_key")))
        scan_ids = sorted(pseudonym(key, "scan", scan_id) for scan_id in scan_ids)
    record = {
        "adapted_from": str(ex["weights"]),
        "source_digest": source_digest,
        "weights_digest": weights_digest(adapted),
        "data": str(index.root),
        "layout": index.layout,
        "label_names": list(index.label_names),
        "resolution": resolution,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "n_scans": len(scan_ids),
        "n_slices": len(labels),
        "scan_ids_sha256": hashlib.sha256("\n".join(scan_ids).encode()).hexdigest(),
        "ids": "kept" if dataset.get("keep_ids", False) else "pseudonymised",
        "scan_ids": scan_ids,
        "sop_digests": sorted({sop_digest(uid) for uid in sop_uids}),
        "slices_left_out": len(errors),
        "history": history,
        "note": "block 5 and a slice classifier trained on these scans' slice labels; never on the scans "
                "stage two trains or validates on (drct train refuses an overlap)",
    }
    sidecar_path(out_path).write_text(json.dumps(record, indent=1))
    return record
