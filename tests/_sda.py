"""A stand-in for the released SDA audio encoder, shared by test_encoders.py and test_bundle_encoder.py."""

from __future__ import annotations

import torch
from torch import nn

from dheads.engine.encoders.sda import SDAEncoder


def seeded_sda() -> SDAEncoder:
    """A seeded SDA with non-trivial BatchNorm statistics (the zero-mean / unit-variance defaults would hide
    a missing BatchNorm), in eval mode."""
    torch.manual_seed(0)
    module = SDAEncoder().eval()
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm1d):
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return module
