"""Where a configured model departs from the DrCT2 paper: one list, read by run.json, the model
card and the README's table "How our protocol differs", so the three never disagree.

Each rule names the config key, what the paper states, and why we differ (measured on the planted
family, BENCHMARKS.md, issue 15). `departures(config)` returns the rules the config triggers: the
`drct2_paper` preset (pipeline/presets.py) triggers none of the model and training rules.
"""

from __future__ import annotations

from pipeline.heads import registry

PAPER = {"feature_attention": "softmax", "feature_attention_scale": "one", "input_norm": "none",
         "input_dropout": 0.0, "weight_decay": 0.0, "lr_primary": 0.0005, "lr_aps": 0.0003, "lr_fusion": 0.0005,
         "loss": "mse_mse_bce", "epochs": 100}


def departures(config: dict) -> list[dict[str, str]]:
    """[{"item", "paper", "here"}] for every way `config` departs from the paper's DrCT1/DrCT2."""
    m, t = config["model"], config["train"]
    name = str(m["name"])
    if registry.spec(name).baseline:
        return [{"item": "model", "paper": "DrCT1 / DrCT2",
                 "here": f"{name}: a baseline head, not the paper's model ({registry.source(name)})"}]
    rows = []
    if m.get("feature_attention") != PAPER["feature_attention"]:
        rows.append({"item": "feature attention (eq. 3)", "paper": "softmax over the raw 512 values, no parameters",
                     "here": f"model.feature_attention: {m.get('feature_attention')} (learnable = softmax(Wz + b), "
                             "a dense scoring layer; the literal form leaves the heads at chance)"})
    if m.get("feature_attention_scale") != PAPER["feature_attention_scale"] and m.get("feature_attention") != "none":
        rows.append({"item": "feature attention scale", "paper": "x = z * w",
                     "here": "x = D * z * w (model.feature_attention_scale: dim): a uniform attention is the identity"})
    if m.get("input_norm") != PAPER["input_norm"]:
        how = (f"each channel minus the scan's own {m.get('scan_centre_quantile')} quantile over its m sampled "
               "slices, over the training fold's sd of centred values; the APS centres its m_key vectors on all m "
               "sampled slices at the APS resolution") if m.get("input_norm") == "scan" else \
            "minus the training fold's mean, over its sd"
        rows.append({"item": "input normalisation", "paper": "none (raw VGG16 vectors)",
                     "here": f"model.input_norm: {m.get('input_norm')}: {how}"})
    if float(m.get("input_dropout") or 0.0) != PAPER["input_dropout"]:
        rows.append({"item": "input dropout", "paper": "dropout 0.5 in the FC layers only",
                     "here": f"also dropout {m.get('input_dropout')} on the 512 input channels of primary and APS "
                             "(model.input_dropout; without it the BiGRU memorises noise channels)"})
    fc_hidden = list(m.get("fc_hidden") or [])
    if len(fc_hidden) != 2:
        rows.append({"item": "FC readouts", "paper": "three FC layers (ReLU, dropout 0.5) in primary, APS and fusion",
                     "here": f"model.fc_hidden: {fc_hidden}: "
                             + ("one linear layer" if not fc_hidden else f"{len(fc_hidden) + 1} FC layers")
                             + " (with three, the primary at 224 px stays on a plateau and its slice attention "
                               "stays uniform; APS and fusion learn slowly)"})
    if float(t.get("weight_decay") or 0.0) != PAPER["weight_decay"]:
        rows.append({"item": "optimiser", "paper": "Adam",
                     "here": f"AdamW, decoupled weight decay {t.get('weight_decay')} (train.weight_decay)"})
    for key in ("lr_primary", "lr_aps", "lr_fusion"):
        if float(t[key]) != PAPER[key]:
            rows.append({"item": f"learning rate ({key})", "paper": str(PAPER[key]), "here": f"train.{key}: {t[key]}"})
    if t.get("loss") != PAPER["loss"]:
        rows.append({"item": "losses", "paper": "MSE (primary), MSE (APS), BCE (fusion)",
                     "here": f"train.loss: {t.get('loss')}" + (" (BCE for all three, the paper's Table 2 alternative: "
                                                              "MSE on sigmoid outputs learns rare classes slowly)"
                                                              if t.get("loss") == "bce" else "")})
    if int(t["epochs"]) != PAPER["epochs"]:
        rows.append({"item": "epochs", "paper": "100", "here": f"train.epochs: {t['epochs']}"})
    return rows
