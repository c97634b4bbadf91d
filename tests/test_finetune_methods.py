"""finetune.method: full, bitfit, lora (peft) and ssf train what they say, and fold back into a plain network."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml
from helpers_images import make_class_folder, sha256
from torch import nn

from conftest import import_or_skip
from pipeline.backbones import load_backbone
from pipeline.config import FinetuneConfig, load_config
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.finetune import methods
from pipeline.finetune.network import FineTuneNet, open_part
from pipeline.finetune.train import fit

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = TransformSpec(72, 64, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FAST = FinetuneConfig(epochs=1, batch_size=4, val_fraction=0.0, device="cpu", precision="fp32", lr_backbone=1e-2,
                      lr_head=1e-2)


def _net(seed=0):
    torch.manual_seed(seed)
    bb = load_backbone("resnet18", "none")
    return FineTuneNet(bb.features, nn.Linear(bb.feature_dim, 2))


def _photos(tmp_path):
    folder = make_class_folder(tmp_path / "photos", {"red": 4, "blue": 4})
    rows = [Row(f"{c}/{f.name}", label, "train", sha256(f))
            for label, c in enumerate(("blue", "red")) for f in sorted((folder / c).iterdir())]
    return folder, rows


def _is_norm_or_bias(net, key: str) -> bool:
    module = net.get_submodule(key.rsplit(".", 1)[0])
    return key.endswith(".bias") or isinstance(module, methods.NORMS)


@pytest.mark.parametrize("method", ["full", "bitfit", "lora", "ssf"])
def test_each_method_trains_on_8_photos_and_leaves_a_plain_network(tmp_path, method):
    if method == "lora":
        import_or_skip("peft", "peft is not installed: pip install -e '.[peft]' (CI installs it)")
    folder, rows = _photos(tmp_path)
    net = _net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    said = []
    fit(net, backbone="resnet18", root=folder, train_rows=rows, val_rows=[], transform_spec=SMALL,
        cfg=dataclasses.replace(FAST, method=method), log=said.append)
    assert net.state_dict().keys() == start.keys()  # the model folder's keys, whatever the method
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
    last = ("features.layer4.",)  # resnet18's last stage: what unfreeze last opens
    assert {"head.weight", "head.bias"} <= changed
    assert all(k.startswith(last) or k.startswith("head.") for k in changed), sorted(changed)[:5]
    in_last = {k for k in changed if k.startswith(last)}
    assert in_last, f"{method} trained nothing of the last stage"
    if method in ("bitfit", "ssf"):
        # resnet's convolutions have no bias: ssf scales and shifts their norms' outputs, folded into the norms
        assert all(_is_norm_or_bias(net, k) for k in in_last), sorted(in_last)[:5]
        assert any(k.endswith("bn1.weight") for k in in_last)
    else:  # full, and lora once folded, move the convolutions' weights
        assert any(k.endswith("conv1.weight") for k in in_last)
    if method != "full":
        assert any(f"method {method}" in s for s in said), said


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_folding_the_method_back_changes_no_output(method):
    if method == "lora":
        import_or_skip("peft", "peft is not installed: pip install -e '.[peft]' (CI installs it)")
    net = _net().eval()
    methods.prepare(net, open_part(net, "resnet18", "last"), method, lora_rank=4, backbone="resnet18")
    torch.manual_seed(1)
    with torch.no_grad():  # adapters that are not zero: a merge that drops them would show
        for name, p in net.named_parameters():
            if "lora_" in name or "ssf_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        adapted = net(x)
        methods.merge(net, method)
        folded = net(x)
    assert net.state_dict().keys() == _net().state_dict().keys()
    assert torch.allclose(adapted, folded, atol=1e-4, rtol=1e-4), (adapted - folded).abs().max()
    assert not torch.allclose(adapted, _net().eval()(x), atol=1e-3)  # the adapters did change the output


def test_a_method_with_nothing_to_adapt_says_which_backbone():
    net = _net()
    for method, says in (("lora", "no Conv2d or Linear layer"), ("ssf", "no layer with a per-channel bias")):
        with pytest.raises(PipelineError, match=f"finetune.method {method}: backbone 'pooling-only' has {says}"):
            methods.prepare(net, [nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1))], method, lora_rank=4,
                            backbone="pooling-only")


@pytest.mark.parametrize("settings, says", [
    ({"method": "adapter"}, "unknown finetune.method 'adapter'; accepted: full, bitfit, lora, ssf"),
    ({"method": "lora", "lora_rank": 0}, "finetune.lora_rank must be a whole number >= 1, found 0"),
    ({"method": "bitfit", "unfreeze": "none"}, "finetune.method bitfit adapts the backbone's open part"),
])
def test_bad_method_params_are_one_line_errors(tmp_path, settings, says):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["finetune"].update(settings)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=re.escape(says)) as e:
        load_config(tmp_path / "params.yaml")
    assert "\n" not in str(e.value)
