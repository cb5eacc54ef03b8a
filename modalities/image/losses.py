"""Perceptual and adversarial terms for VQ-VAE training (plug into ``msar.training.VQVAETrainer``).

* :class:`PerceptualLoss`: LPIPS-style distance on VGG16 features.  The backbone
  weights are a file the user passes by path (torchvision's ``vgg16`` state dict
  layout, ``features.N.weight``); optional LPIPS linear heads (``lin0..lin4``) too.
  Nothing downloads.
* :class:`PatchDiscriminator`: the PatchGAN of pix2pix / taming-transformers, for
  the hinge adversarial loss with adaptive weight and delayed start that
  ``VQVAETrainer`` implements.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's numbering
_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers, c = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """``loss(x, y)``: mean over layers of spatially averaged, channel-weighted squared
    differences of unit-normalised VGG16 features (LPIPS). Inputs in [-1, 1], 1 or 3 channels."""

    def __init__(self, vgg_weights: str | None = None, lpips_weights: str | None = None):
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS])
        for lin in self.lins:
            nn.init.constant_(lin.weight, 1.0 / lin.in_channels)
        if vgg_weights:
            from .checkpoint import read_state_dict
            sd = read_state_dict(vgg_weights)
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
            missing = set(self.features.state_dict()) - set(sd)
            if missing:
                raise ValueError(f"{vgg_weights}: not a VGG16 state dict (missing {sorted(missing)[:4]} ...)")
            self.features.load_state_dict(sd)
        if lpips_weights:
            from .checkpoint import read_state_dict
            sd = read_state_dict(lpips_weights)
            for i, lin in enumerate(self.lins):
                key = next((k for k in sd if k.startswith(f"lin{i}.") and k.endswith("weight")), None)
                if key is None:
                    raise ValueError(f"{lpips_weights}: no weight for lin{i}")
                lin.weight.data.copy_(sd[key].view_as(lin.weight))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
                if len(out) == len(_TAPS):
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(lin((a - b).pow(2)).mean() for lin, a, b in zip(self.lins, self._taps(x), self._taps(y)))

    def train(self, mode: bool = True) -> "PerceptualLoss":  # frozen feature extractor
        return super().train(False)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``(B, C, H, W) -> (B, 1, h, w)`` real/fake logits per patch."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ch * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
