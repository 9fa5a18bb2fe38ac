"""The network: a small 3-level 3-D U-Net in plain torch (no framework), scriptable with torch.jit.script.

Levels of `base`, 2*`base` and 4*`base` channels, two 3x3x3 convolutions (BatchNorm, leaky ReLU) per level,
max-pool down, transposed convolution up, skip connections by concatenation, one logit per voxel.
Input (batch, 1, z, y, x) with every spatial size divisible by 4; output the same size, one channel.
BatchNorm (not instance/group norm) so a voxel's output does not depend on which other voxels share
its patch or its batch: the sliding window and the OOM batch-halving give the same answer. Leaky ReLU:
with plain ReLU a training run once settled with every feature dead inside nodules, capping their
probability at sigmoid(head bias) = 0.38.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NoduleUNet(nn.Module):
    def __init__(self, base: int = 8) -> None:
        super().__init__()
        b = base
        self.enc1 = _Block(1, b)
        self.enc2 = _Block(b, 2 * b)
        self.bottom = _Block(2 * b, 4 * b)
        self.pool = nn.MaxPool3d(2)
        self.up2 = nn.ConvTranspose3d(4 * b, 2 * b, 2, stride=2)
        self.dec2 = _Block(4 * b, 2 * b)
        self.up1 = nn.ConvTranspose3d(2 * b, b, 2, stride=2)
        self.dec1 = _Block(2 * b, b)
        self.head = nn.Conv3d(b, 1, 1)
        # Start from the prior (nodules are rare) so training does not begin by pushing every voxel down.
        nn.init.constant_(self.head.bias, -3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)
