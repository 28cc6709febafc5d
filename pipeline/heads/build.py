"""Build the head the config names (``model.name``, pipeline/heads/registry.py), and run one.

Nothing here knows a head: each head's module builds it (its HeadSpec), and `predict` turns any
HeadOutput into the run files' arrays (pipeline/heads/head.py).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.heads import registry
from pipeline.heads.head import ApsSource, Head, run_tensors


def head_spec(config: dict):
    """The HeadSpec of config["model"]["name"]; ValueError naming the registered heads."""
    return registry.spec(config["model"]["name"])


def build_model(config: dict, n_classes: int) -> Head:
    """The model named by ``model.name`` for `n_classes` outputs, sized by the config."""
    spec = head_spec(config)
    if n_classes < 1:
        raise ValueError("the cache has no label names: a model needs at least one class")
    return spec.build(config, n_classes)


@torch.no_grad()
def predict(model: Head, primary: torch.Tensor, aps_source: ApsSource | None = None,
            feature_attention: str = "full") -> dict[str, np.ndarray]:
    """Evaluation-mode forward pass -> numpy arrays: logits*, prob, prob_primary, prob_aps (B, C),
    slice_attention (B, m), feature_attention (B, m, 512), aps_idx (B, m_key) (-1 for DrCT1);
    what a head does not output is filled as for DrCT1 (`head.run_tensors`).

    `primary` is (B, m, 512) at the primary resolution; `aps_source` a (B, m, 512) tensor at
    the APS resolution or a callable aps_idx (B, m_key) -> (B, m_key, 512) (see DrCT.forward).
    feature_attention="count": instead of the weights, `feature_attention_channels` (B, m), the
    effective number of channels of each slice's weights, computed on the device (a per-epoch
    summary that does not copy 512 values per slice to the host).
    """
    was_training = model.training
    model.eval()
    try:
        z = primary.float()
        out = run_tensors(model(z, aps_source), z, model.m_key)
    finally:
        model.train(was_training)
    keys = [key for key in out if key != "aps_idx" and (key != "feature_attention" or feature_attention == "full")]
    result = {key: out[key].float().cpu().numpy() for key in keys}
    if feature_attention != "full":
        w = out["feature_attention"].double().clamp_min(1e-12)
        result["feature_attention_channels"] = \
            torch.exp(-(w * w.log()).sum(-1)).clamp_max(w.shape[-1]).float().cpu().numpy()
    result["aps_idx"] = out["aps_idx"].cpu().numpy().astype(np.int64)
    return result
