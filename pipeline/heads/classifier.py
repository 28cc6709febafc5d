"""The fully connected readout every DrCT head ends with (paper V.A.3: three layers).

"Weighted feature vectors pass through three fully connected layers [...] dropout rate 0.5.
The activation function of the first two fully-connected layers is ReLU, and for the output
layer, we used sigmoid function." The architecture is data: ``widths = [in, h1, h2, classes]``;
the sigmoid is applied by the caller so the BCE loss can use the stable logits form.
The project's default is ``hidden = []``, one linear layer (``model.fc_hidden``; issue 15: with three
layers the primary network at 224 px never leaves its plateau, BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def make_classifier(in_dim: int, hidden: Sequence[int], n_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """Linear-ReLU-Dropout for each width in `hidden`, then Linear to `n_classes` logits.

    The paper has exactly three layers (``len(hidden) == 2``); other lengths are allowed.
    """
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = int(h)
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)
