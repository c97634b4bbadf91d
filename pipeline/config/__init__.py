"""params.yaml as typed configuration: one frozen dataclass per section.

Each section's defaults are written once, in its dataclass; each section checks
its own values when it is built, so a stage receives settings that are known
to be good. A key params.yaml names but no section has (``heads.logreg.c``) is
an error naming the key and what is accepted, instead of a setting that
silently does nothing. Stages call :func:`load_config` once.

Example:
    >>> cfg = load_config("params.yaml")          # doctest: +SKIP
    >>> cfg.backbone.name, cfg.heads.head("logreg").C   # doctest: +SKIP
    ('resnet50', (0.01, 0.1, 1.0))
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import reads
from pipeline.config.checks import DECODERS, ENGINES, HEAD_KINDS, METHODS, PARAMETERISATIONS, SOURCES, Section, check_split_params
from pipeline.config.sections import (
    UNFREEZE, AttackConfig, BackboneConfig, DataConfig, EvaluateConfig, ExtractConfig, FeatureMapsConfig,
    FinetuneConfig, HeadConfig, HeadsConfig, QualityConfig, RayConfig, VisualizeConfig,
)
from pipeline.errors import PipelineError

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and DVC, which writes params.yaml) does."""


# YAML 1.1 wants a dot in a float, so `1e-05` (how `dvc exp run -S finetune.lr_head=0.00001`
# writes it, and how people write small learning rates) would be read as a string.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str):
    """YAML text as Python values, numbers in exponent form (``1e-05``) included."""
    return yaml.load(text, Loader=_Loader)


__all__ = [
    "DECODERS", "ENGINES", "HEAD_KINDS", "METHODS", "PARAMETERISATIONS", "SOURCES", "UNFREEZE", "AttackConfig", "BackboneConfig", "Config",
    "DataConfig", "EvaluateConfig", "ExtractConfig", "FeatureMapsConfig", "FinetuneConfig", "HeadConfig",
    "HeadsConfig", "QualityConfig", "RayConfig", "Section", "VisualizeConfig", "check_split_params", "load_config",
    "parse_config", "read_yaml",
]


@dataclass(frozen=True)
class Config:
    """The whole of params.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def parse_config(given: dict, source: str = "params.yaml") -> Config:
    """Build a :class:`Config` from a params mapping (as read from YAML)."""
    if not isinstance(given, dict):
        raise PipelineError(f"{source} must hold a mapping of sections, found {type(given).__name__}")
    for key in given:
        if key not in SECTIONS:
            raise PipelineError(
                f"unknown params key '{key}' in {source}; accepted here: {', '.join(sorted(SECTIONS))}"
            )
    return Config(**{
        name: {"heads": HeadsConfig}.get(name, type(factory())).from_mapping(given.get(name), name, source)
        for name, factory in SECTIONS.items()
    })


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and check params.yaml.

    Raises:
        PipelineError: the file is missing or unreadable, names an unknown key,
            or holds a bad value; the message names the key.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run from the project root, where params.yaml lives")
    try:
        given = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = parse_config(given, str(path))
    reads.start()  # with TL_RECORD_PARAMS set: note every key the stage reads from here on
    return cfg
