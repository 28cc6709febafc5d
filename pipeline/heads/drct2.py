"""DrCT2 = primary network (DrCT1) + APS + knowledge fusion (paper V, Fig. 4).

One forward pass::

    z (B, m, 512) at the primary resolution  -> PrimaryNetwork -> slice_attention (B, m)
    aps_idx (B, m_key) = positions of the m_key highest-attention slices, sorted (z order)
                         (or a random subset: the Fig. 6 ablation)
    F (B, m_key, 512)  = the APS-resolution vectors of those slices, from `aps_source`
                         (a gather in the in-memory cache; the paper reruns VGG16 at 512 here)
    F -> APSNetwork -> KnowledgeFusion(primary matrix, APS matrix) -> fusion logits

The selection is a hard top-k: no gradient flows through the choice of slices (as in the
paper, where the APS input is a new CNN pass on the chosen images).

With ``aps=None`` the same class is DrCT1: `prob` is the primary's and the APS outputs are absent
(None; NaN and -1 in the run files, pipeline/heads/head.py), so every consumer reads one format.

The two registry entries (pipeline/heads/registry.py) are `DRCT1` and `DRCT2` at the end: the
builder from the config, and the paper's loss (eq. 11, ``train.loss``).
"""

from __future__ import annotations

import torch

from pipeline.heads.aps import APSNetwork
from pipeline.heads.fusion import KnowledgeFusion
from pipeline.heads.head import ApsSource, Head, HeadOutput, HeadSpec, LossTerm
from pipeline.heads.primary import PrimaryNetwork

SELECTIONS = ("attention", "random")
ATTENTION_SCALES = ("dim", "one")
LOSSES = ("mse_mse_bce", "bce")  # train.loss


def select_slices(
    slice_attention: torch.Tensor,
    m_key: int,
    mode: str = "attention",
    generator: torch.Generator | None = None,
    repeated: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, m) attention -> (B, m_key) int64 positions in increasing (z) order.

    "attention": the m_key largest weights (paper V.B); "random": a uniform random subset
    (paper Fig. 6), drawn from `generator` when given so that evaluation can be repeatable.
    `repeated` (B, m) bool marks positions that show the same slice as an earlier position (a
    scan shorter than m repeats slices): they rank after every other position, so one slice is
    never zoomed in on twice while the scan has m_key distinct slices to choose from.
    """
    if mode == "attention":
        score = slice_attention.detach()
    elif mode == "random":
        score = torch.rand(slice_attention.shape, generator=generator, device="cpu").to(slice_attention.device)
    else:
        raise ValueError(f"unknown APS selection '{mode}'; choose from {SELECTIONS}")
    if repeated is not None:
        span = (score.max() - score.min()).clamp_min(1.0) + 1.0
        score = score - span * repeated.to(score.dtype)
    chosen = torch.topk(score, m_key, dim=1).indices
    return torch.sort(chosen, dim=1).values


def repeated_positions(z: torch.Tensor) -> torch.Tensor:
    """(B, m, D) sampled vectors -> (B, m) bool: position i shows the same vector as i - 1.
    Sampled positions are in z order, so a repeated slice of a short scan is always adjacent to
    its first occurrence; equal vectors are the same cache row (or identical images)."""
    repeated = torch.zeros(z.shape[:2], dtype=torch.bool, device=z.device)
    repeated[:, 1:] = (z[:, 1:] == z[:, :-1]).all(dim=-1)
    return repeated


def gather_aps(aps_source: ApsSource, aps_idx: torch.Tensor) -> torch.Tensor:
    """APS input (B, m_key, D): rows `aps_idx` of a (B, m, D) tensor, or what a getter returns."""
    if callable(aps_source) and not isinstance(aps_source, torch.Tensor):
        return aps_source(aps_idx)
    index = aps_idx.unsqueeze(-1).expand(-1, -1, aps_source.shape[-1])
    return torch.gather(aps_source, 1, index)


class DrCT(Head):
    """DrCT2 (with `aps` and `fusion`) or DrCT1 (without).

    forward(z (B, m, D), aps_source) -> HeadOutput:
      logits/prob (B, C) final (fusion for DrCT2, primary for DrCT1); logits_primary,
      prob_primary, logits_aps, prob_aps (B, C) (APS: None for DrCT1); slice_attention (B, m);
      feature_attention (B, m, D); aps_idx (B, m_key) (None for DrCT1).
    `aps_source` is a (B, m, D_aps) tensor of the APS-resolution vectors of the m sampled slices,
    or a callable mapping aps_idx (B, m_key) to (B, m_key, D_aps) (the cache gather).
    """

    def __init__(
        self,
        primary: PrimaryNetwork,
        aps: APSNetwork | None = None,
        fusion: KnowledgeFusion | None = None,
        selection: str = "attention",
        m_key: int = 0,
    ):
        super().__init__()
        if (aps is None) != (fusion is None):
            raise ValueError("DrCT2 needs both an APS network and a fusion network (DrCT1 neither)")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown APS selection '{selection}'; choose from {SELECTIONS}")
        self.primary = primary
        self.aps = aps
        self.fusion = fusion
        self.selection = selection
        # width of aps_idx in the output; DrCT1 fills it with -1 so run files have one shape
        self.m_key = aps.m_key if aps is not None else int(m_key)
        self.generator: torch.Generator | None = None  # for repeatable random selection

    @property
    def variant(self) -> str:
        return "drct1" if self.aps is None else "drct2"

    def forward(self, z: torch.Tensor, aps_source: ApsSource | None = None) -> HeadOutput:
        p = self.primary(z)
        primary = {"logits_primary": p["logits"], "prob_primary": p["prob"],
                   "slice_attention": p["slice_attention"], "feature_attention": p["feature_attention"]}
        if self.aps is None:
            return HeadOutput(logits=p["logits"], prob=p["prob"], **primary)
        if aps_source is None:
            raise ValueError("DrCT2 needs the APS-resolution features (aps_source)")
        aps_idx = select_slices(p["slice_attention"], self.aps.m_key, self.selection, self.generator,
                                repeated_positions(z))
        context = None
        if self.aps.reads_scan_context:
            every = torch.arange(z.shape[1], device=z.device).expand(z.shape[0], -1)
            context = gather_aps(aps_source, every)
        a = self.aps(gather_aps(aps_source, aps_idx), context)
        logits = self.fusion(p, a, aps_idx)
        return HeadOutput(logits=logits, prob=torch.sigmoid(logits), logits_aps=a["logits"], prob_aps=a["prob"],
                          aps_idx=aps_idx, **primary)

    def evaluation_seed(self, seed: int | None) -> None:
        """A random APS selection (Fig. 6 ablation) draws from a generator seeded here."""
        self.generator = torch.Generator().manual_seed(seed) if seed is not None and self.selection == "random" \
            else None

    def standardizers(self) -> list:
        """(norm, resolution) pairs whose statistics the trainer sets from the training fold."""
        pairs = [(self.primary.standardize, "primary")]
        if self.aps is not None:
            pairs.append((self.aps.standardize, "aps"))
        return [(norm, res) for norm, res in pairs if norm is not None]

    def parameter_groups(self, lr_primary: float, lr_aps: float, lr_fusion: float) -> list[dict]:
        """Adam parameter groups with the paper's per-module learning rates (VI.A.1)."""
        groups = [{"params": list(self.primary.parameters()), "lr": lr_primary, "name": "primary"}]
        if self.aps is not None:
            groups.append({"params": list(self.aps.parameters()), "lr": lr_aps, "name": "aps"})
            groups.append({"params": list(self.fusion.parameters()), "lr": lr_fusion, "name": "fusion"})
        return groups


def build_drct(config: dict, n_classes: int, aps: bool = True) -> DrCT:
    """DrCT2 (or DrCT1 with aps=False) for `n_classes` outputs, sized by config["model"] and
    sampler.m: every size comes from ``configs/defaults.yaml``; this only wires the parts (like
    torchvision's ``vgg.py`` builder)."""
    mc = config["model"]
    m = int(config["sampler"]["m"])
    dim = int(mc["feature_dim"])
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
    if not aps:
        return DrCT(primary, m_key=min(int(mc["m_key"]), m))
    m_key = int(mc["m_key"])
    if not 1 <= m_key <= m:
        raise ValueError(f"model.m_key = {m_key} must be between 1 and sampler.m = {m}")
    aps_network = APSNetwork(
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
    fusion = KnowledgeFusion(
        n_classes,
        str(mc["fusion"]),
        primary.out_dim,
        aps_network.out_dim,
        m,
        fusion_dim=int(mc["fusion_dim"]),
        fc_hidden=fc_hidden,
        dropout=dropout,
    )
    return DrCT(primary, aps_network, fusion, selection=str(mc["aps_selection"]))


def paper_loss(config: dict, aps: bool = True) -> tuple[LossTerm, ...]:
    """The paper's loss (V.D, eq. 11): Loss_primary + Loss_aps + Loss_fusion (DrCT1: the first).
    ``train.loss: mse_mse_bce`` (the paper): MSE (eq. 12) on the sigmoid outputs of primary and
    APS, BCE (eq. 13) for fusion; ``bce``: BCE for all three (the Table 2 comparison)."""
    kind = str(config["train"]["loss"])
    if kind not in LOSSES:
        raise ValueError(f"unknown loss '{kind}'; choose from {LOSSES}")
    each = "mse" if kind == "mse_mse_bce" else "bce"
    terms = (LossTerm("primary", "logits_primary", each),)
    if aps:
        terms += (LossTerm("aps", "logits_aps", each), LossTerm("fusion", "logits", "bce"))
    return terms


DRCT1 = HeadSpec(build=lambda config, n_classes: build_drct(config, n_classes, aps=False),
                 loss_terms=lambda config: paper_loss(config, aps=False))
DRCT2 = HeadSpec(build=build_drct, loss_terms=paper_loss)
