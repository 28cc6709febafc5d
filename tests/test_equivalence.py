"""The cached path equals an end-to-end path: VGG16 run inline on the pixels of the same
sampled and selected slices, with the same weights, gives the same logits (DESIGN.md)."""

from __future__ import annotations

import numpy as np
import torch

from cache.provenance import config_provenance
from cache.store import FeatureCache, write_cache
from pipeline.config import load_config
from pipeline.features.encoder import load_encoder
from pipeline.features.preprocess import preprocess_slice
from pipeline.heads.build import build_model
from pipeline.training.dataset import CachedFeatures
from pipeline.training.sampler import eval_positions
from pipeline.training.trainer import predict_scans

torch.set_num_threads(1)
RES = [32, 64]
M, K = 6, 3


def _scans(rng):
    """Two small 'head CTs' of HU values: a disc of brain with a bright blob on a few slices."""
    yy, xx = np.mgrid[:48, :48]
    scans = []
    for n in (4, 11):  # shorter than m (repeats) and longer than m
        slices = []
        for s in range(n):
            hu = np.where((yy - 24) ** 2 + (xx - 24) ** 2 < 400, 35.0, -1000.0) + rng.normal(0, 5, (48, 48))
            if s % 3 == 1:
                hu[20 + s % 5 : 26 + s % 5, 18:24] = 70.0
            slices.append(hu.astype(np.float32))
        scans.append(slices)
    return scans


def test_cached_and_end_to_end_logits_match(tmp_path):
    config = load_config(None, {
        "extract.resolutions": RES, "extract.weights": "random:0", "sampler.m": M, "model.m_key": K,
        "model.gru_hidden": 8, "model.aps_gru_hidden": 8, "model.aps_fc": 16, "model.fc_hidden": [16, 12],
        "model.fusion_dim": 16,
    })
    ex = config["extract"]
    encoder, digest = load_encoder(ex["weights"])
    rng = np.random.default_rng(0)
    scans = _scans(rng)

    def encode(hus, resolution):
        inputs = torch.stack([preprocess_slice(hu, RES, ex["windows"], ex["aps_source"])[resolution] for hu in hus])
        with torch.no_grad():
            return encoder(inputs)

    # stage one: every slice at both resolutions into a cache (stored as float16)
    all_slices = [hu for scan in scans for hu in scan]
    features = {r: encode(all_slices, r).numpy() for r in RES}
    total = len(all_slices)
    attrs = {**config_provenance(ex), "weights_digest": digest, "label_names": ["a", "b"]}
    path = write_cache(
        tmp_path / "c.h5", scan_ids=["s0", "s1"], patient_ids=["p0", "p1"], scan_labels=np.zeros((2, 2)),
        n_slices=[len(s) for s in scans], z=np.arange(total, dtype=float), sop_uids=[str(i) for i in range(total)],
        paths=[f"{i}.dcm" for i in range(total)], slice_labels=np.zeros((total, 2)), features=features, attrs=attrs,
    )

    torch.manual_seed(0)
    model = build_model(config, 2).eval()
    for p in model.parameters():  # make the heads sensitive to the inputs, not near-constant
        p.data.mul_(3.0)

    # cached path: the training/evaluation code reading the cache
    data = CachedFeatures.from_cache(FeatureCache(path), RES[0], RES[1])
    cached = predict_scans(model, data, np.array([0, 1]), M, 8)

    # end-to-end path: the CNN run inline on the pixels of the sampled, then the selected, slices
    positions = eval_positions(np.array([len(s) for s in scans]), M)
    np.testing.assert_array_equal(positions, cached["sample_idx"])
    for rounding in (True, False):
        def as_cached(x, rounding=rounding):  # the cache stores float16: the same rounding gives bit-for-bit inputs
            return x.half().float() if rounding else x

        primary = torch.stack([as_cached(encode([scan[i] for i in pos], RES[0])) for scan, pos in zip(scans, positions)])

        def aps_getter(aps_idx):
            chosen = [[scan[positions[b][j]] for j in aps_idx[b].tolist()] for b, scan in enumerate(scans)]
            return torch.stack([as_cached(encode(hus, RES[1])) for hus in chosen])

        with torch.no_grad():
            inline = model(primary, aps_getter)
        np.testing.assert_array_equal(inline.aps_idx.numpy(), cached["aps_idx"])
        tol = {"rtol": 1e-5, "atol": 1e-6} if rounding else {"rtol": 2e-2, "atol": 2e-3}
        for key in ("logits", "logits_primary", "logits_aps", "prob"):
            np.testing.assert_allclose(getattr(inline, key).numpy(), cached[key], **tol, err_msg=key)
        np.testing.assert_allclose(inline.slice_attention.numpy(), cached["slice_attention"], **tol)
    assert np.ptp(cached["logits"], axis=0).max() > 1e-3  # the two scans give different logits
