"""A small CNN digit classifier used only to *evaluate* generated digits.

It is trained on real digits (never on samples); its accuracy on samples says
whether a sample reads as the requested class, and its penultimate features
give a Fréchet distance between real and generated sets (FID's recipe with a
network that needs no downloaded weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


class DigitClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, feat_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(256, feat_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 400, batch_size: int = 128,
                     seed: int = 0, progress: bool = True, desc: str = "classifier") -> DigitClassifier:
    """Train on ``(N, C, H, W)`` real images in [-1, 1] with light noise/shift augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True):
        i = torch.randint(0, len(labels), (batch_size,), generator=g)
        x = images[i]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3)) + 0.1 * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(model(x), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (predicted labels ``(N,)``, features ``(N, D)``)."""
    preds, feats = [], []
    for x in images.split(batch_size):
        f = model.features(x)
        feats.append(f)
        preds.append(model.head(f).argmax(-1))
    return torch.cat(preds), torch.cat(feats)
