"""What trains inside the backbone's open part: ``finetune.method``.

- ``full``: every parameter of the open part (``finetune.unfreeze``).
- ``bitfit``: its biases and its normalisation layers' scales and shifts only.
- ``lora``: low-rank adapters (``finetune.lora_rank``) beside its Conv2d and Linear
  layers, from the ``peft`` library (``pip install ".[peft]"``); the layers
  themselves stay frozen. Grouped (depthwise) convolutions get none: their
  weights are a few per channel already.
- ``ssf``: a learnt scale and shift per output channel (Lian et al., 2022, "Scaling
  & Shifting Your Features") after each of its layers whose output has one, that
  is, those with a bias (a convolution's or linear layer's, a norm's shift). A
  convolution without a bias feeds a norm, whose own scale and shift follow it;
  on a network of convolutions and batch norms (ResNet, EfficientNet) SSF thus
  trains the norms' affine maps in another parametrisation, and on a
  transformer or ConvNeXt it also scales every linear layer's output.

The head always trains whole. Whatever the method, the network is folded back
into plain layers when training ends (:func:`merge`), so the model folder holds an
ordinary network: the same state-dict keys, the same export, no adapter code
needed to load it.
"""

from __future__ import annotations

from torch import nn

from pipeline.config import METHODS
from pipeline.errors import PipelineError

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def prepare(net: nn.Module, open_part: list[nn.Module], method: str, *, lora_rank: int, backbone: str) -> None:
    """Add the method's parameters to ``open_part`` (the backbone modules ``unfreeze`` opens), in place.

    Called before the depth groups and the optimiser are built, so that what the
    method adds is part of them.

    Raises:
        PipelineError: an unknown method, or one the open part has no layer for (naming the backbone).
    """
    if method not in METHODS:
        raise PipelineError(f"unknown finetune.method '{method}'; accepted: {', '.join(METHODS)}")
    if method == "lora":
        _add_lora(net, open_part, lora_rank, backbone)
    elif method == "ssf":
        layers = [m for top in open_part for m in top.modules() if _ssf_channels(m)]
        if not layers:
            raise PipelineError(f"finetune.method ssf: backbone '{backbone}' has no layer with a per-channel bias "
                                "in the part finetune.unfreeze opens; use full, bitfit or lora")
        for m in layers:
            _add_ssf(m)


def restrict(net: nn.Module, head: nn.Module, method: str) -> None:
    """After ``unfreeze``: of the backbone's trainable parameters, keep trainable only what ``method`` trains."""
    if method == "full":
        return
    head_params = {id(p) for p in head.parameters()}
    for path, module in net.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in head_params or not p.requires_grad:
                continue
            if method == "bitfit":
                keep = name == "bias" or isinstance(module, NORMS)
            elif method == "ssf":
                keep = name in ("ssf_scale", "ssf_shift")
            else:  # lora: the adapters' own layers, lora_A.<adapter> and lora_B.<adapter>
                keep = ".lora_" in f".{path}"
            p.requires_grad_(keep)


def merge(net: nn.Module, method: str) -> None:
    """Fold the method's parameters into the layers they adapt: ``net`` is a plain network again."""
    if method == "lora":
        from peft.tuners.lora import LoraLayer

        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.merge()
                    setattr(parent, name, child.get_base_layer())
    elif method == "ssf":
        for m in net.modules():
            if hasattr(m, "ssf_scale"):
                _fold_ssf(m)


def _add_lora(net: nn.Module, open_part: list[nn.Module], rank: int, backbone: str) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise PipelineError("finetune.method is 'lora' but peft is not installed; install it with "
                            "pip install 'transfer-pipeline[peft]' (or pip install peft), or set finetune.method: "
                            "full, bitfit or ssf") from None
    names = {id(m): n for n, m in net.named_modules()}
    targets = [names[id(m)] for top in open_part for m in top.modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    if not targets:
        raise PipelineError(f"finetune.method lora: backbone '{backbone}' has no Conv2d or Linear layer in the part "
                            "finetune.unfreeze opens; use full, bitfit or ssf")
    # alpha = rank: the adapters' update is B @ A, scaled by 1, at any rank.
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=targets)
    inject_adapter_in_model(config, net)


def _ssf_channels(m: nn.Module) -> int:
    """The output channels an SSF scale and shift would fold into, or 0 where they cannot."""
    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
        return m.bias.shape[0]
    if isinstance(m, NORMS) and getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None:
        return m.weight.shape[0]
    return 0


def _channel_axis(m: nn.Module) -> int:
    return -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1


def _ssf_hook(m, inputs, out):
    shape = [1] * out.ndim
    axis = _channel_axis(m) % out.ndim
    shape[axis] = -1
    return out * m.ssf_scale.view(shape) + m.ssf_shift.view(shape)


def _add_ssf(m: nn.Module) -> None:
    c = _ssf_channels(m)
    # On the layer itself, not a wrapper: the layer stays where the depth groups and the
    # last-stage rule find it, and its new parameters come with it.
    m.register_parameter("ssf_scale", nn.Parameter(m.bias.new_ones(c)))
    m.register_parameter("ssf_shift", nn.Parameter(m.bias.new_zeros(c)))
    # timm's norm + activation layers (BatchNormAct2d) apply their activation inside: the
    # scale and shift go on the affine output, before it, where their ``drop`` child sits.
    after = getattr(m, "drop", None) if isinstance(m, NORMS) else None
    if isinstance(after, nn.Module):
        m._ssf_handle = after.register_forward_hook(lambda _, inputs, out, m=m: _ssf_hook(m, inputs, out))
    else:
        m._ssf_handle = m.register_forward_hook(_ssf_hook)


def _fold_ssf(m: nn.Module) -> None:
    """``scale * layer(x) + shift`` as one layer: weight and bias scaled, the shift added to the bias."""
    s, t = m.ssf_scale.detach(), m.ssf_shift.detach()
    w = m.weight.detach()
    w.mul_(s.view(-1, *[1] * (w.ndim - 1)))
    m.bias.detach().mul_(s).add_(t)
    m._ssf_handle.remove()
    del m._ssf_handle
    del m.ssf_scale
    del m.ssf_shift
