"""Build a DrCT1/DrCT2 model from the config (``model`` and ``sampler`` sections), and run it.

The architecture is data: every size comes from ``configs/defaults.yaml``; this module only
wires the parts (like torchvision's ``vgg.py`` builder).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.heads.abmil import GatedAttentionMIL
from pipeline.heads.aps import APSNetwork
from pipeline.heads.baseline_base import BaselineHead
from pipeline.heads.drct2 import ApsSource, DrCT
from pipeline.heads.fusion import KnowledgeFusion
from pipeline.heads.meanpool import MeanPoolMIL
from pipeline.heads.names import BASELINES, MODELS
from pipeline.heads.pooled_logistic import PooledLogistic
from pipeline.heads.primary import PrimaryNetwork

ATTENTION_SCALES = ("dim", "one")


def is_baseline(config: dict) -> bool:
    return str(config["model"]["name"]).lower() in BASELINES


def build_model(config: dict, n_classes: int) -> DrCT | BaselineHead:
    """The model named by ``model.name`` for `n_classes` outputs, sized by the config."""
    mc = config["model"]
    m = int(config["sampler"]["m"])
    name = str(mc["name"]).lower()
    if name not in MODELS:
        raise ValueError(f"unknown model '{mc['name']}'; choose from {', '.join(MODELS)}")
    if n_classes < 1:
        raise ValueError("the cache has no label names: a model needs at least one class")
    dim = int(mc["feature_dim"])
    if name in BASELINES:
        return build_baseline(name, mc, n_classes, m)
    fc_hidden = [int(h) for h in mc["fc_hidden"]]
    dropout = float(mc["dropout"])
    readout_mode = str(mc.get("readout", "sum"))
    activation = str(mc.get("activation", "tanh"))
    scale = str(mc.get("feature_attention_scale", "dim"))
    if scale not in ATTENTION_SCALES:
        raise ValueError(f"unknown model.feature_attention_scale '{scale}'; choose from {ATTENTION_SCALES}")
    input_dropout = float(mc.get("input_dropout", 0.3))
    if not 0.0 <= input_dropout < 1.0:
        raise ValueError(f"model.input_dropout must be in [0, 1), got {input_dropout}")
    quantile = float(mc.get("scan_centre_quantile", 0.2))
    primary = PrimaryNetwork(
        n_classes,
        m,
        feature_dim=dim,
        gru_hidden=int(mc["gru_hidden"]),
        fc_hidden=fc_hidden,
        dropout=dropout,
        readout_mode=readout_mode,
        feature_attention=str(mc.get("feature_attention", "learnable")),
        activation=activation,
        input_norm=str(mc.get("input_norm", "scan")),
        attention_rescale=scale == "dim",
        input_dropout=input_dropout,
        scan_centre_quantile=quantile,
    )
    if name == "drct1":
        return DrCT(primary, m_key=min(int(mc["m_key"]), m))
    m_key = int(mc["m_key"])
    if not 1 <= m_key <= m:
        raise ValueError(f"model.m_key = {m_key} must be between 1 and sampler.m = {m}")
    aps = APSNetwork(
        n_classes,
        m_key,
        feature_dim=dim,
        fc_dim=int(mc["aps_fc"]),
        gru_hidden=int(mc["aps_gru_hidden"]),
        fc_hidden=fc_hidden,
        dropout=dropout,
        readout_mode=readout_mode,
        activation=activation,
        row_pool=str(mc.get("aps_row_pool", "mean")),
        input_norm=str(mc.get("input_norm", "scan")),
        input_dropout=input_dropout,
        scan_centre_quantile=quantile,
    )
    primary_dim = primary.out_dim
    aps_dim = aps.out_dim
    fusion = KnowledgeFusion(
        n_classes,
        str(mc["fusion"]),
        primary_dim,
        aps_dim,
        m,
        fusion_dim=int(mc["fusion_dim"]),
        fc_hidden=fc_hidden,
        dropout=dropout,
    )
    return DrCT(primary, aps, fusion, selection=str(mc["aps_selection"]))


def build_baseline(name: str, mc: dict, n_classes: int, m: int) -> BaselineHead:
    """A baseline head (issue 15), with DrCT's input norm and input dropout."""
    dim = int(mc["feature_dim"])
    m_key = min(int(mc["m_key"]), m)
    if name == "pooled_logistic":
        return PooledLogistic(n_classes, m_key, dim)
    common = {"feature_dim": dim, "hidden": int(mc.get("baseline_hidden", 128)), "dropout": float(mc["dropout"]),
                  "input_dropout": float(mc.get("input_dropout", 0.3)), "input_norm": str(mc.get("input_norm", "scan")),
                  "scan_centre_quantile": float(mc.get("scan_centre_quantile", 0.2))}
    if name == "meanpool":
        return MeanPoolMIL(n_classes, m_key, **common)
    return GatedAttentionMIL(n_classes, m_key, **common)


OUTPUT_KEYS = (
    "logits", "logits_primary", "logits_aps",
    "prob", "prob_primary", "prob_aps", "slice_attention", "feature_attention", "aps_idx",
)


@torch.no_grad()
def predict(model: DrCT | BaselineHead, primary: torch.Tensor, aps_source: ApsSource | None = None,
            feature_attention: str = "full") -> dict[str, np.ndarray]:
    """Evaluation-mode forward pass -> numpy arrays: logits*, prob, prob_primary, prob_aps (B, C),
    slice_attention (B, m), feature_attention (B, m, 512), aps_idx (B, m_key) (-1 for DrCT1).

    `primary` is (B, m, 512) at the primary resolution; `aps_source` a (B, m, 512) tensor at
    the APS resolution or a callable aps_idx (B, m_key) -> (B, m_key, 512) (see DrCT.forward).
    feature_attention="count": instead of the weights, `feature_attention_channels` (B, m), the
    effective number of channels of each slice's weights, computed on the device (a per-epoch
    summary that does not copy 512 values per slice to the host).
    """
    was_training = model.training
    model.eval()
    try:
        out = model(primary.float(), aps_source)
    finally:
        model.train(was_training)
    keys = [key for key in OUTPUT_KEYS if key != "aps_idx" and (key != "feature_attention" or feature_attention == "full")]
    result = {key: out[key].float().cpu().numpy() for key in keys}
    if feature_attention != "full":
        w = out["feature_attention"].double().clamp_min(1e-12)
        result["feature_attention_channels"] = \
            torch.exp(-(w * w.log()).sum(-1)).clamp_max(w.shape[-1]).float().cpu().numpy()
    result["aps_idx"] = out["aps_idx"].cpu().numpy().astype(np.int64)
    return result
