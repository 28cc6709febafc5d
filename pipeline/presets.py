"""Named sets of settings (`drct train --preset NAME`), applied over the config file and under
--set flags.

``drct2_paper`` is DrCT2 as the paper states it, nothing of ours added where the paper speaks:
eq. 3 as a parameter-free softmax over the raw 512 values with scale one (x = z * w), no input
normalisation, no input dropout, three FC layers in primary, APS and fusion, plain Adam (no weight decay) at the paper's learning rates and
losses. The project's defaults depart from it (README, "How our protocol differs"); the planted
family benchmark (bench/heads.py) always runs both.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    "drct2_paper": {
        "model.name": "drct2",
        "model.feature_attention": "softmax",
        "model.feature_attention_scale": "one",
        "model.input_norm": "none",
        "model.input_dropout": 0.0,
        "model.fc_hidden": [256, 128],  # three FC layers in primary, APS and fusion
        "train.weight_decay": 0.0,
        "train.lr_primary": 0.0005,
        "train.lr_aps": 0.0003,
        "train.lr_fusion": 0.0005,
        "train.loss": "mse_mse_bce",
    },
}


def preset_overrides(name: str | None) -> dict[str, object]:
    """The dotted settings of preset `name` (none for None); ValueError naming the presets."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])
