"""One registry of heads (issue 18): pipeline/heads/registry.py is the only list of head names, and
a head is one module (CONTRIBUTING.md, "Add a head"): a toy head registered here, with no other
file edited, trains with `drct train --set model.name=toy`, writes the run files every head writes
and is evaluated and reloaded like the others."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.heads import registry
from pipeline.heads.build import build_model
from pipeline.heads.head import Head, HeadOutput, HeadSpec, LossTerm
from pipeline.synthetic.synthetic import write_synthetic_cache
from pipeline.training.checkpoint import load_model
from stages.cli import main

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["any", "bleed"]
SMALL = {"sampler.m": 6, "model.m_key": 3, "model.gru_hidden": 8, "model.aps_gru_hidden": 8, "model.aps_fc": 16,
         "model.fusion_dim": 16, "train.batch_size": 8, "train.folds": 2, "train.threads": 1}


def test_every_registered_head_builds_and_returns_head_output():
    for name in registry.names():
        spec = registry.spec(name)
        assert isinstance(spec, HeadSpec) and spec.primary_view in ("primary", "aps"), name
        model = build_model(load_config(None, {**SMALL, "model.name": name}), 2).eval()
        assert isinstance(model, Head), name
        with torch.no_grad():
            out = model(torch.rand(2, 6, 512), torch.rand(2, 6, 512))
        assert isinstance(out, HeadOutput) and out.logits.shape == (2, 2), name
        assert (out.slice_attention is not None) == spec.slice_attention, name
        assert registry.source(name).startswith("pipeline/heads/") and (ROOT / registry.source(name)).is_file()
    with pytest.raises(ValueError, match="unknown model 'drct3'; choose from drct1, drct2"):
        registry.spec("drct3")


def test_the_registry_is_the_only_list_of_heads(monkeypatch):
    """The config schema, `drct train --model` and bench/heads.py offer exactly the registry's
    names, and no other source file spells out a list of them."""
    heads = registry.names()
    # the schema reads the registry when it validates: a name registered now is accepted
    for name in heads:
        assert load_config(None, {"model.name": name})["model"]["name"] == name
    with pytest.raises(ConfigError, match="unknown model 'toy'"):
        load_config(None, {"model.name": "toy"})
    monkeypatch.setitem(registry.HEADS, "toy", registry.HEADS["abmil"])
    assert load_config(None, {"model.name": "toy"})["model"]["name"] == "toy"
    monkeypatch.delitem(registry.HEADS, "toy")

    from stages.train import train

    [model_option] = [p for p in train.params if p.name == "model"]
    assert tuple(model_option.type.choices) == heads

    spec = importlib.util.spec_from_file_location("bench_heads", ROOT / "bench" / "heads.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.MODELS) - {"drct2_paper"} == set(heads)  # drct2_paper: a preset of drct2
    assert set(bench.MODEL_SETTINGS) == set(bench.MODELS)
    assert bench.BASELINE_MODELS == tuple(n for n in heads if registry.spec(n).baseline)

    # no second list: no literal tuple/list/set/dict outside the registry names three or more heads
    offenders = []
    for folder in ("pipeline", "stages", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "pipeline" / "heads" / "registry.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                items = node.keys if isinstance(node, ast.Dict) else \
                    node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
                named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in heads}
                if len(named) >= 3:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


class ToyHead(Head):
    """Mean of the slice vectors -> one linear layer; a slice attention from a linear score."""

    variant = "toy"

    def __init__(self, n_classes: int, feature_dim: int):
        super().__init__()
        self.score = nn.Linear(feature_dim, 1)
        self.linear = nn.Linear(feature_dim, n_classes)

    def forward(self, z, aps_source=None) -> HeadOutput:
        attention = torch.softmax(self.score(z).squeeze(-1), dim=1)
        logits = self.linear((attention.unsqueeze(-1) * z).sum(dim=1))
        return HeadOutput(logits=logits, prob=torch.sigmoid(logits), slice_attention=attention)


TOY = HeadSpec(build=lambda config, n_classes: ToyHead(n_classes, int(config["model"]["feature_dim"])),
               loss_terms=lambda config: (LossTerm("toy", "logits", "bce"),), baseline=True)


def test_a_head_registered_by_one_line_trains_through_drct_train(monkeypatch, tmp_path):
    """The proof the issue asks for: one module (here, ToyHead and TOY above) plus one registry
    line, and `drct train --set model.name=toy` trains it with nothing else edited."""
    monkeypatch.setitem(registry.HEADS, "toy", TOY)
    cache = write_synthetic_cache(tmp_path / "c.h5", load_config(None, SMALL), NAMES, n_scans=20, slices=(5, 12),
                                  scans_per_patient=2, seed=0)
    out = tmp_path / "run"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**SMALL, "model.name": "toy"}.items()]
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--cache", str(cache), "--out", str(out), "--epochs", "2", "--quiet", *sets])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == "toy" and info["resolutions"] == {"primary": 224, "aps": 512}
    assert info["departures_from_paper"][0]["here"].startswith("toy: a baseline head")
    history = json.loads((out / "fold_1" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all("loss_toy" in h for h in history)
    oof = np.load(out / "oof.npz")
    assert oof["prob"].shape == (20, 2) and np.isfinite(oof["prob"]).all()
    np.testing.assert_array_equal(oof["prob_primary"], oof["prob"])  # one network: its own primary
    assert np.isnan(oof["prob_aps"]).all() and oof["aps_idx"].shape == (20, 0)
    assert oof["feature_attention"].shape == (20, 6, 512) and oof["slice_attention"].shape == (20, 6)
    np.testing.assert_allclose(oof["slice_attention"].sum(1), 1, rtol=1e-5)
    assert np.ptp(oof["slice_attention"], axis=1).max() > 0  # its own attention, not the uniform fill
    model, _, _ = load_model(out / "fold_0" / "checkpoint.pt")
    assert isinstance(model, ToyHead) and set(model.state_dict()) == {"score.weight", "score.bias", "linear.weight",
                                                                      "linear.bias"}
    result = runner.invoke(main, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output
