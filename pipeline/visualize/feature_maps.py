"""Feature maps: where in a photo the backbone's last convolutional layer responds.

For a few test photos, taken in turn from each class, a panel shows the photo
beside the strongest channels of the backbone's last spatial activation (the
map before global pooling), each scaled to its own range and coloured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.config import FeatureMapsConfig
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.runtime import Placement
from pipeline.visualize.networks import CPU
from pipeline.visualize.pictures import fresh_dir, load_pixels, save_png, slug, to_pil

#: A few stops of the viridis colour map (dark blue -> green -> yellow).
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def _colormap(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> uint8 RGB (H, W, 3)."""
    pos = np.clip(a, 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def last_spatial_activation(model: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The last 4-D activation with more than one spatial position that ``model(x)`` computes.

    That is the last convolutional feature map before global pooling, whatever
    the architecture (timm EfficientNet's ``bn2``, a ResNet's ``layer4``, VGG's
    last conv block): every module gets a forward hook, and the last output of
    shape (N, C, H, W) with H·W > 1 wins (pooling's (N, C, 1, 1) does not count).

    Returns:
        the module's qualified name and its output (detached).
    """
    found: list = [None]  # only the latest: keeping every activation would cost memory
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
                found[0] = (name, output.detach().clone())  # clone: a later in-place ReLU may overwrite it

        return fn

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name or type(model).__name__)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if found[0] is None:
        raise ValueError(f"{type(model).__name__} computes no spatial (N, C, H, W) activation")
    return found[0]


def feature_map_panel(features: nn.Module, spec: TransformSpec, x: torch.Tensor, channels: int = 16,
                      compute: Placement = CPU) -> tuple[Image.Image, str]:
    """The input image beside its ``channels`` strongest last-conv feature maps.

    Channels are ranked by mean activation; each is scaled to its own
    [min, max] and coloured, and upsampled without interpolation (the cells are
    the real resolution of the map).

    Args:
        features: the network's feature extractor (a backbone's, or a fine-tuned one).
        spec: its input normalisation.
        x: one image (3, H, W) in [0, 1].

    Returns:
        the panel and the name of the module whose output is shown.
    """
    s = spec
    mean = torch.tensor(s.mean).view(1, 3, 1, 1)
    std = torch.tensor(s.std).view(1, 3, 1, 1)
    with compute.autocast():
        name, act = last_spatial_activation(features.to(compute.device),
                                            ((x[None] - mean) / std).to(compute.device))
    act = act[0].float().cpu()
    top = act.mean((1, 2)).argsort(descending=True)[: max(1, int(channels))]
    cols = math.ceil(math.sqrt(len(top)))
    rows = math.ceil(len(top) / cols)
    side = x.shape[-1]
    tile = side // rows
    panel = Image.new("RGB", (side + 4 + cols * tile, side), (255, 255, 255))
    panel.paste(to_pil(x), (0, 0))
    for k, c in enumerate(top.tolist()):
        m = act[c]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
        im = Image.fromarray(_colormap(m.numpy())).resize((tile - 1, tile - 1), Image.NEAREST)
        panel.paste(im, (side + 4 + (k % cols) * tile, (k // cols) * tile))
    return panel, name


def round_robin(rows: list[Row], n: int) -> list[Row]:
    """Up to ``n`` rows taken in turn from each class (classes by label, rows in their order)."""
    queues: dict[int, list[Row]] = {}
    for r in rows:
        queues.setdefault(r.label, []).append(r)
    ordered = [queues[label] for label in sorted(queues)]
    picks = []
    for k in range(max(map(len, ordered), default=0)):
        picks += [q[k] for q in ordered if k < len(q)]
    return picks[:n]


def draw_feature_maps(features: nn.Module, spec: TransformSpec, root, rows: list[Row], pixels: Callable, fm: FeatureMapsConfig,
                      classes: list[str], compute: Placement, out_dir: Path) -> list[str]:
    """Write ``feature_maps/<k>_<class>.png`` for ``fm.images`` of ``rows``; returns the files' names."""
    kept, xs = load_pixels(root, round_robin(rows, fm.images), pixels)
    names, module = [], None
    with fresh_dir(out_dir / "feature_maps") as folder:
        for k, (row, x) in enumerate(zip(kept, xs if xs is not None else [])):
            panel, module = feature_map_panel(features, spec, x, fm.channels, compute)
            names.append(f"{k}_{slug(classes[row.label])}.png")
            save_png(panel, folder / names[-1])
    if module:
        print(f"visualize: feature maps of '{module}' for {len(names)} images in {out_dir / 'feature_maps'}")
    return names
