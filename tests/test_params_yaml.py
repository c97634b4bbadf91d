"""params.yaml is read as DVC writes it: numbers in exponent form are numbers."""

from __future__ import annotations

import pytest
import yaml
from dvc.utils.serialize import dump_yaml

from pipeline.config import load_config, read_yaml
from pipeline.errors import PipelineError


def test_a_small_learning_rate_as_dvc_writes_it_is_a_number(tmp_path):
    """``dvc exp run -S finetune.lr_head=0.00001`` writes ``1e-05``, which YAML 1.1 reads as a string."""
    path = tmp_path / "params.yaml"
    dump_yaml(path, {"finetune": {"lr_head": 0.00001, "lr_backbone": 3e-4}})  # DVC's own writer
    assert "lr_head: 1e-05" in path.read_text()
    assert isinstance(yaml.safe_load(path.read_text())["finetune"]["lr_head"], str)  # why read_yaml exists
    cfg = load_config(path)
    assert cfg.finetune.lr_head == 1e-05 and cfg.finetune.lr_backbone == 3e-4


@pytest.mark.parametrize("text, value", [("1e-05", 1e-05), ("-2E+3", -2000.0), ("5e3", 5000.0), (".5e-1", 0.05),
                                         ("3.0e-4", 3e-4), ("10", 10), ("0.1", 0.1)])
def test_numbers_in_every_form_are_numbers(text, value):
    got = read_yaml(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["1e-05x", "e5", "1e", "'1e-05'"])
def test_what_is_not_a_number_stays_a_string(text):
    assert isinstance(read_yaml(f"x: {text}")["x"], str)


def test_a_string_where_a_number_is_expected_is_still_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  lr_head: 1e-05x\n")
    with pytest.raises(PipelineError, match=r"finetune.lr_head must be a number in \(0, inf\), found '1e-05x'"):
        load_config(path)
