"""Dependencies learning (paper V.A.2, eq. 4): a bidirectional GRU over the slice sequence.

Each time step's output is y_t = g(W_y [a_fwd_t, a_bwd_t] + b_y): the forward and backward GRU
states are concatenated, mapped by one linear layer (W_y, b_y) and passed through the activation
g (tanh by default: the paper leaves g open). Adjacent slices are what tells a bleed from a
calcification (paper Fig. 3), hence the recurrence along z.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "identity": nn.Identity}


class DependenciesLearning(nn.Module):
    """(B, T, in_dim) -> (B, T, out_dim), out_dim = 2 * hidden (eq. 4's W_y keeps the width)."""

    def __init__(self, in_dim: int, hidden: int, activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose from {sorted(ACTIVATIONS)}")
        self.gru = nn.GRU(in_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden
        self.project = nn.Linear(2 * hidden, self.out_dim)  # W_y, b_y of eq. 4
        self.g = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(x)  # (B, T, 2H): [a_fwd_t, a_bwd_t]
        return self.g(self.project(states))
