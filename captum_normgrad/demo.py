"""The built-in demo behind ``captum-normgrad demo`` (placeholder model until the benchmark lands)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .normgrad import LayerNormGrad
from ._maps import normalize_maps


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).eval()


def run_demo(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    model = _tiny_cnn()
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 0.2
    img[:, 0, 8:16, 8:16] = 1.0
    m = LayerNormGrad(model, model[3]).attribute(img, target=0)
    fig, ax = plt.subplots(1, 2, figsize=(6, 3))
    ax[0].imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())
    ax[1].imshow(normalize_maps(m)[0, 0].detach().numpy(), cmap="jet")
    for a in ax:
        a.axis("off")
    path = out / "normgrad_demo.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {path}"
