"""The network that fine-tuning trains: ``head(features(x))``, and which parts of it train.

The head starts as fine-tuning's own warm-start logistic-regression head
(:mod:`pipeline.finetune.warmstart`) with its scaler folded in (the heads'
``to_torch_linear``). Before the first optimiser step the
network therefore predicts what the head predicts, so no head-only warm-up pass
is needed and early large errors cannot wreck the pretrained filters.

Only the head and the parts ``unfreeze`` names train; everything else stays in
eval mode, so it computes exactly what feature extraction computed, and batch
norm keeps its statistics everywhere.
"""

from __future__ import annotations

from torch import nn

from pipeline.backbones import last_stage_modules
from pipeline.backbones.registry import REGISTRY
from pipeline.config import UNFREEZE
from pipeline.errors import PipelineError
from pipeline.heads.model import to_torch_linear


class FineTuneNet(nn.Module):
    """``head(features(x))``; its state dict is what ``models/finetune/model.safetensors`` holds."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


def build_network(features: nn.Module, head_estimator) -> FineTuneNet:
    """Backbone features + a linear layer equal to the fitted scaler + linear head."""
    return FineTuneNet(features, to_torch_linear(head_estimator))


#: Depth groups below the last stage, for ``progressive`` unfreezing and layer-wise decay.
LOWER_GROUPS = 3


def depth_groups(net: FineTuneNet, backbone: str) -> list[list[nn.Module]]:
    """The backbone in depth groups, top first: the last stage, then three slices of the layers below.

    Group 0 is what ``unfreeze: last`` trains (:func:`last_stage_modules`).
    The layers with parameters below it, in registration order (the forward
    order of the registry's architectures), are cut into :data:`LOWER_GROUPS`
    slices of about equal numbers of layers: one rule for every architecture,
    where a per-architecture table of stages would need a row for each.
    """
    top = last_stage_modules(backbone, net.features)
    in_top = {id(q) for m in top for q in m.parameters()}
    leaves = [m for m in net.features.modules()
              if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))
              and not any(id(q) in in_top for q in m.parameters())]
    n = len(leaves)
    cuts = [round(n * k / LOWER_GROUPS) for k in range(LOWER_GROUPS + 1)]
    lower = [leaves[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    return [top, *reversed(lower)]


def unfreeze_modules(net: FineTuneNet, backbone: str, unfreeze: str, epoch: int = 1) -> list[list[nn.Module]]:
    """Set ``requires_grad`` for what trains in ``epoch``; return every group that may train.

    Args:
        backbone: the registry name, which picks the ``last`` rule.
        unfreeze: ``none`` (head only), ``last`` (the last stage), ``all``, or
            ``progressive``: epoch 1 trains the last stage, and each later
            epoch one more depth group below it (:func:`depth_groups`).
        epoch: the epoch about to run (1 = the first); only ``progressive`` reads it.

    Returns:
        ``[[head], group 0, group 1, ...]``: the head, then the backbone's depth
        groups top first, the still-frozen ones of ``progressive`` included, so
        that the optimiser gives every group its own learning rate from the
        start. :func:`open_modules` lists the ones that train now.
    """
    if unfreeze not in UNFREEZE:
        raise PipelineError(f"unknown finetune.unfreeze '{unfreeze}'; accepted: {', '.join(UNFREEZE)}")
    if unfreeze == "none":
        groups = []
    elif unfreeze == "last":
        groups = [last_stage_modules(backbone, net.features)]
    elif unfreeze == "all" and backbone not in REGISTRY:
        groups = [[net.features]]  # no last-stage rule to cut depth groups by: one group
    else:
        groups = depth_groups(net, backbone)
    groups = [[net.head], *groups]
    net.requires_grad_(False)
    for m in open_modules(groups, unfreeze, epoch):
        m.requires_grad_(True)
    return groups


def open_part(net: FineTuneNet, backbone: str, unfreeze: str) -> list[nn.Module]:
    """The backbone modules ``unfreeze`` ever opens (every epoch of ``progressive`` together)."""
    if unfreeze == "none":
        return []
    if unfreeze == "last":
        return last_stage_modules(backbone, net.features)
    return [net.features]


def open_modules(groups: list[list[nn.Module]], unfreeze: str, epoch: int) -> list[nn.Module]:
    """The modules of ``groups`` that train in ``epoch``: all, except the still-frozen progressive groups."""
    n = 1 + max(1, epoch) if unfreeze == "progressive" else len(groups)
    return [m for g in groups[:n] for m in g]


def set_train_mode(net: nn.Module, trainable: list[nn.Module]) -> None:
    """Train mode for ``trainable`` only, and batch norm in eval mode everywhere.

    Frozen parts then compute exactly what feature extraction computed. Batch
    norm keeps its ImageNet statistics even where its scale and shift train:
    statistics of batches of 16 from a few hundred photos are noisy, and on the
    dog-breed sample updating them left the training loss after an epoch at
    0.93 instead of 0.62 and the test loss at 0.48 instead of 0.42 (Keras's
    transfer-learning guide gives the same advice).
    """
    net.eval()
    for m in trainable:
        m.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
