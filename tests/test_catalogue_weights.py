"""Weights offline: the errors say which file goes in which folder, and a file put there is used.

No test downloads: torch's hub and the Hugging Face hub are pointed at empty
temporary folders and the network calls fail at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error

import huggingface_hub
import pytest
import safetensors.torch
import torch
import torch.hub
import torchvision.models as tvm

from pipeline.backbones import get_spec, load_backbone
from pipeline.fileio import file_digest
from pipeline.backbones.base import seeded
from pipeline.errors import PipelineError

DINO = "timm/vit_small_patch14_dinov2.lvd142m"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME and no network for torch's hub."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (what HF_HUB_OFFLINE=1 and HF_HOME set at start-up give)."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_torchvision_file_names_file_folder_and_remedy(torch_home):
    with pytest.raises(PipelineError) as e:
        load_backbone("convnext_tiny", "IMAGENET1K_V1")
    msg = str(e.value)
    assert "convnext_tiny-983f1562.pth" in msg and str(torch_home) in msg
    assert "https://download.pytorch.org/models/convnext_tiny-983f1562.pth" in msg
    assert "copy that file into" in msg and "backbone.weights" in msg and "\n" not in msg


def test_a_torchvision_file_placed_in_the_cache_is_used(torch_home):
    """What the error says to do works: GoogLeNet's builder re-normalises inputs for its weights."""
    w = tvm.GoogLeNet_Weights.IMAGENET1K_V1
    with seeded():
        torch.manual_seed(1)  # other values than the seeded random init
        trained = tvm.googlenet(weights=None, aux_logits=True, init_weights=True)
    torch_home.mkdir(parents=True)
    file = torch_home / "googlenet-1378be20.pth"
    torch.save(trained.state_dict(), file)

    bb = load_backbone("googlenet")
    assert bb.weights == "GoogLeNet_Weights.IMAGENET1K_V1" and bb.weights_sha256 == file_digest(file)
    assert bb.features.transform_input and bb.features.aux1 is None
    torch.testing.assert_close(bb.features.conv1.conv.weight, trained.conv1.conv.weight)
    # The architecture built for loading a fine-tuned state is the same network.
    arch = load_backbone("googlenet", w.name, pretrained=False)
    arch.features.load_state_dict(bb.features.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(arch.features(x), bb.features(x))


def test_missing_timm_file_names_model_file_folder_and_remedy(tmp_path):
    """As a user meets it: HF_HUB_OFFLINE=1 and an empty HF_HOME, read when the process starts."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    code = ("from pipeline.backbones import load_backbone; from pipeline.cli import run_stage; "
            f"run_stage(lambda: load_backbone({DINO!r}, 'DEFAULT', 224))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    msg = res.stderr.strip().splitlines()[-1]
    cache = tmp_path / "hf" / "hub"
    assert msg.startswith("error: ") and DINO in msg and "model.safetensors" in msg and str(cache) in msg
    assert "models--timm--vit_small_patch14_dinov2.lvd142m" in msg and "hf download" in msg
    assert "(offline)" in msg and "backbone.weights" in msg


def test_a_timm_weights_file_is_used_at_another_input_size(tmp_path, hf_offline):
    """A local file of DINOv2 at 518 px loads at 224 px: timm resamples the position embeddings."""
    spec = get_spec(DINO)
    with seeded():
        torch.manual_seed(1)
        trained = spec.architecture(0)  # at the weights' own 518 px
    file = tmp_path / "dinov2_s.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(file))

    bb = load_backbone(DINO, str(file), 224)
    assert bb.weights == str(file) and bb.weights_sha256 == file_digest(file)
    assert bb.features.pos_embed.shape[1] == (224 // 14) ** 2 + 1
    torch.testing.assert_close(bb.features.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert bb.features(torch.rand(1, 3, 224, 224)).shape == (1, bb.feature_dim)


def test_timm_names_and_weights_are_checked():
    with pytest.raises(PipelineError, match=r"unknown timm backbone 'timm/vit_small_patch14_dinov3.*did you mean"):
        load_backbone("timm/vit_small_patch14_dinov3.lvd142m", "none")
    with pytest.raises(PipelineError, match=r"unknown weights 'IMAGENET1K_V1' for timm/.*accepted: DEFAULT, lvd142m"):
        load_backbone(DINO, "IMAGENET1K_V1")
    with pytest.raises(PipelineError, match=r"convnext_base.fb_in22k_ft_in1k_384 preprocesses with squash crops"):
        load_backbone("timm/convnext_base.fb_in22k_ft_in1k_384", "none")
    # No tag: timm's default tag, which the weights label records.
    assert get_spec("timm/convnext_tiny").model == "convnext_tiny.in12k_ft_in1k"
