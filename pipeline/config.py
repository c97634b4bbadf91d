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
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.heads.registry import HEADS
from pipeline.runtime import DEVICES, PRECISIONS

# The accepted values of params keys whose meaning lives elsewhere: kept here,
# with the checks, so that reading params.yaml depends on no stage's code
# (a test checks each tuple against the module that implements it).
SOURCES = ("cats-vs-dogs", "folder", "oxford-iiit-pet")  # pipeline.data.sources
DECODERS = ("auto", "pillow", "pillow-exact", "torchvision")  # pipeline.extract.decode
PARAMETERISATIONS = ("fourier", "pixel")  # pipeline.visualize.optvis

# ------------------------------------------------------------------- checks


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _bad(key: str, want: str, found) -> PipelineError:
    return PipelineError(f"{key} must be {want}, found {found!r}")


def _int(where, name, value, lo=0):
    if not _is_int(value) or value < lo:
        raise _bad(f"{where}.{name}", f"a whole number >= {lo}", value)


def _num(where, name, value, lo=0.0, hi=float("inf"), lo_open=True, hi_open=True):
    ok = _is_num(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise _bad(f"{where}.{name}", f"a number in {left}{lo:g}, {hi:g}{right}", value)


def _choice(where, name, value, accepted):
    if value not in accepted:
        raise PipelineError(f"unknown {where}.{name} '{value}'; accepted: {', '.join(map(str, accepted))}")


def check_split_params(test_fraction, seed) -> None:
    """``data.test_fraction`` and ``data.seed`` (also checked by the prepare stage's library call)."""
    if not _is_num(test_fraction) or not 0 < test_fraction < 1:
        raise PipelineError(f"data.test_fraction must be a number between 0 and 1 (both "
                            f"excluded); found {test_fraction!r}; set e.g. 0.2 in params.yaml")
    if not _is_int(seed) or seed < 0:
        raise PipelineError(f"data.seed must be a non-negative integer; found {seed!r}; "
                            f"set e.g. 0 in params.yaml")


def _device(where, value):
    s = str(value)
    if s not in ("auto", "cpu", "cuda") and not (s.startswith("cuda:") and s[5:].isdigit()):
        raise PipelineError(f"unknown {where}.device '{value}'; accepted: {', '.join(DEVICES)}")


# ------------------------------------------------------------------- building


class Section:
    """Base of the sections: building from a mapping checks every key."""

    _where = ""

    @classmethod
    def from_mapping(cls, given: Any, where: str, source: str = "params.yaml"):
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise PipelineError(f"params key '{where}' in {source} must be a mapping, found {given!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        for key in given:
            if key not in fields:
                raise PipelineError(
                    f"unknown params key '{where}.{key}' in {source}; accepted here: {', '.join(sorted(fields))}"
                )
        kwargs = {}
        for name, f in fields.items():
            sub = _section_type(f)
            if sub is not None:
                kwargs[name] = sub.from_mapping(given.get(name), f"{where}.{name}", source)
            elif name in given:
                kwargs[name] = given[name]
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_type(f):
    t = f.type if isinstance(f.type, type) else globals().get(str(f.type))
    return t if isinstance(t, type) and issubclass(t, Section) else None


# ------------------------------------------------------------------- sections

@dataclass(frozen=True)
class DataConfig(Section):
    source: str = "oxford-iiit-pet"  # oxford-iiit-pet | cats-vs-dogs | folder
    folder: str = "data/images"
    download_dir: str = "data/raw"
    test_fraction: float = 0.2
    seed: int = 0
    archive_sha256: str = ""

    def __post_init__(self):
        _choice("data", "source", self.source, SOURCES)
        check_split_params(self.test_fraction, self.seed)


@dataclass(frozen=True)
class BackboneConfig(Section):
    name: str = "resnet50"
    weights: str = "DEFAULT"
    # The square input's side in pixels; 0: the weights' own. Published linear
    # probes sometimes use another (DINOv2: timm's 518 px, the paper's 224 px).
    input_size: int = 0

    def __post_init__(self):
        # The name itself is checked by the registry when the backbone is loaded.
        if not isinstance(self.name, str) or not self.name:
            raise _bad("backbone.name", "a backbone name (python -m pipeline backbones)", self.name)
        object.__setattr__(self, "weights", str(self.weights))
        _int("backbone", "input_size", self.input_size)


@dataclass(frozen=True)
class RayConfig(Section):
    address: str = ""
    num_gpus_per_worker: float = 0
    concurrency: int = 2

    def __post_init__(self):
        if not isinstance(self.address, str):
            raise PipelineError(
                f"extract.ray.address must be a string ('' to start a local Ray, 'auto' or "
                f"'ray://host:10001' to join a cluster), found {self.address!r}"
            )
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise _bad("extract.ray.concurrency", "a positive integer (actors)", self.concurrency)
        if not _is_num(self.num_gpus_per_worker) or self.num_gpus_per_worker < 0:
            raise _bad("extract.ray.num_gpus_per_worker", "0 (CPU actors) or a positive number",
                       self.num_gpus_per_worker)


@dataclass(frozen=True)
class ExtractConfig(Section):
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    decoder: str = "auto"
    decode_threads: int = 1
    compile: Any = "auto"
    store: str = "data/cache/features"
    flush_every: int = 256
    engine: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise PipelineError(f"extract.batch_size must be a positive integer, found {self.batch_size!r}")
        _device("extract", self.device)
        _choice("extract", "precision", self.precision, PRECISIONS)
        _choice("extract", "decoder", self.decoder, DECODERS)
        _int("extract", "decode_threads", self.decode_threads, lo=1)
        _choice("extract", "compile", self.compile, ("auto", True, False))
        _int("extract", "flush_every", self.flush_every, lo=1)
        _choice("extract", "engine", self.engine, ("local", "ray"))


@dataclass(frozen=True)
class HeadConfig(Section):
    """``heads.<name>``: the C grid and the iteration cap of one head."""

    C: Any = None
    max_iter: int | None = None
    _name: str = ""

    def check(self, name: str) -> "HeadConfig":
        spec = HEADS[name]
        C = spec.C if self.C is None else self.C
        grid = [C] if isinstance(C, (int, float)) else list(C) if isinstance(C, (list, tuple)) else None
        if not grid or not all(_is_num(c) and c > 0 for c in grid):
            raise PipelineError(f"heads.{name}.C must be a positive number or a list of them, found {C!r}")
        max_iter = spec.max_iter if self.max_iter is None else self.max_iter
        _int(f"heads.{name}", "max_iter", max_iter, lo=1)
        return HeadConfig(C=tuple(float(c) for c in grid), max_iter=int(max_iter), _name=name)


@dataclass(frozen=True)
class HeadsConfig:
    """``heads``: shared settings, and one :class:`HeadConfig` per registry head."""

    cv_folds: int = 5
    seed: int = 0
    out_of_core: bool = False
    chunk_rows: int = 65536
    epochs: int = 10
    backbones: Any = ()  # more backbones whose features are concatenated after backbone.name's
    per_head: dict = field(default_factory=dict)  # name -> HeadConfig

    SHARED = ("cv_folds", "seed", "out_of_core", "chunk_rows", "epochs", "backbones")

    @classmethod
    def from_mapping(cls, given, where="heads", source="params.yaml"):
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise PipelineError(f"params key '{where}' in {source} must be a mapping, found {given!r}")
        accepted = sorted([*cls.SHARED, *HEADS])
        for key in given:
            if key not in accepted:
                raise PipelineError(f"unknown params key '{where}.{key}' in {source}; "
                                    f"accepted here: {', '.join(accepted)}")
        per_head = {
            name: HeadConfig.from_mapping(given.get(name), f"{where}.{name}", source).check(name) for name in HEADS
        }
        return cls(**{k: given[k] for k in cls.SHARED if k in given}, per_head=per_head)

    def __post_init__(self):
        _int("heads", "cv_folds", self.cv_folds, lo=2)
        _int("heads", "seed", self.seed)
        if not isinstance(self.out_of_core, bool):
            raise _bad("heads.out_of_core", "true or false", self.out_of_core)
        if not _is_int(self.chunk_rows) or self.chunk_rows < 1:
            raise _bad("heads.chunk_rows", "a positive integer (rows per read)", self.chunk_rows)
        _int("heads", "epochs", self.epochs, lo=1)
        extra = self.backbones if isinstance(self.backbones, (list, tuple)) else None
        if extra is None or not all(isinstance(b, str) and b for b in extra) or len(set(extra)) != len(extra):
            raise _bad("heads.backbones", "a list of distinct backbone names (python -m pipeline backbones)",
                       self.backbones)
        object.__setattr__(self, "backbones", tuple(extra))
        if self.out_of_core and extra:
            raise PipelineError("heads.out_of_core streams one cache; with heads.backbones set, keep "
                                "heads.out_of_core: false (the concatenated features are read into memory)")
        if not self.per_head:
            object.__setattr__(self, "per_head", {n: HeadConfig().check(n) for n in HEADS})

    def head(self, name: str) -> HeadConfig:
        return self.per_head[name]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.SHARED}
        d.update({n: {"C": list(h.C), "max_iter": h.max_iter} for n, h in self.per_head.items()})
        return d


UNFREEZE = ("none", "last", "all")


@dataclass(frozen=True)
class FinetuneConfig(Section):
    unfreeze: str = "last"
    epochs: int = 3
    batch_size: int = 16
    lr_head: float = 3e-4
    lr_backbone: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    val_fraction: float = 0.2
    patience: int = 2
    max_minutes: float = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    decode_workers: Any = "auto"
    head_C: float = 0.1  # the warm-start head's C: fixed, never chosen on the validation slice
    ema: float = 0.0  # per-step decay of an average of the weights; 0 = off
    tta_flip: bool = False  # score each photo and its mirror image, average the logits

    def __post_init__(self):
        w = "finetune"
        _num(w, "head_C", self.head_C)
        _num(w, "ema", self.ema, hi=1, lo_open=False)
        if not isinstance(self.tta_flip, bool):
            raise _bad(f"{w}.tta_flip", "true or false", self.tta_flip)
        _choice(w, "unfreeze", self.unfreeze, UNFREEZE)
        _int(w, "epochs", self.epochs)
        _int(w, "seed", self.seed)
        if self.decode_workers != "auto" and not (_is_int(self.decode_workers) and self.decode_workers >= 0):
            raise _bad(f"{w}.decode_workers", "auto or a whole number >= 0", self.decode_workers)
        _int(w, "batch_size", self.batch_size, lo=1)
        _int(w, "patience", self.patience, lo=1)
        for key in ("lr_head", "lr_backbone", "max_minutes"):
            _num(w, key, getattr(self, key))
        _device(w, self.device)
        _choice(w, "precision", self.precision, PRECISIONS)
        _num(w, "weight_decay", self.weight_decay, lo_open=False)
        _num(w, "warmup_fraction", self.warmup_fraction, hi=1, lo_open=False)
        _num(w, "label_smoothing", self.label_smoothing, hi=1, lo_open=False)
        _num(w, "val_fraction", self.val_fraction, hi=0.5, lo_open=False)


@dataclass(frozen=True)
class AttackConfig(Section):
    source: str = ""
    target: str = ""
    eps: Any = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    steps: int = 10
    max_images: int = 16
    random_start: bool = True
    save: int = 3
    transfer_to: str = ""
    transfer_head: str = ""

    def __post_init__(self):
        w = "visualize.attack"
        eps = self.eps if isinstance(self.eps, (list, tuple)) else [self.eps]
        if not eps or not all(_is_num(e) and 0 < e <= 1 for e in eps):
            raise PipelineError(
                f"{w}.eps must be a list of budgets in (0, 1] (8/255 = 0.0314), found {self.eps!r}"
            )
        object.__setattr__(self, "eps", tuple(sorted(float(e) for e in eps)))
        _int(w, "steps", self.steps, lo=1)
        _int(w, "max_images", self.max_images, lo=1)
        _int(w, "save", self.save)
        if not isinstance(self.random_start, bool):
            raise _bad(f"{w}.random_start", "true or false", self.random_start)
        if bool(self.transfer_to) != bool(self.transfer_head):
            raise PipelineError(f"{w}.transfer_to and transfer_head go together: set both or neither")


@dataclass(frozen=True)
class FeatureMapsConfig(Section):
    images: int = 4
    channels: int = 16

    def __post_init__(self):
        _int("visualize.feature_maps", "images", self.images)
        _int("visualize.feature_maps", "channels", self.channels, lo=1)


@dataclass(frozen=True)
class VisualizeConfig(Section):
    classes: Any = ()
    imagenet_classes: Any = (285, 340)
    model: str = "logreg"
    param: str = "fourier"
    steps: int = 256
    lr: float = 0.05
    tv_weight: float = 250.0
    l2_weight: float = 20.0
    seed: int = 0
    judge: str = "efficientnet_lite2"
    device: str = "auto"
    precision: str = "auto"
    attack: AttackConfig = field(default_factory=AttackConfig)
    feature_maps: FeatureMapsConfig = field(default_factory=FeatureMapsConfig)

    def __post_init__(self):
        w = "visualize"
        _choice(w, "model", self.model, tuple(HEADS))
        _choice(w, "param", self.param, PARAMETERISATIONS)
        _int(w, "steps", self.steps, lo=1)
        _num(w, "lr", self.lr)
        _num(w, "tv_weight", self.tv_weight, lo_open=False)
        _num(w, "l2_weight", self.l2_weight, lo_open=False)
        _int(w, "seed", self.seed)
        _device(w, self.device)
        _choice(w, "precision", self.precision, PRECISIONS)
        ids = list(self.imagenet_classes or [])
        bad = [i for i in ids if not _is_int(i) or not 0 <= i < 1000]
        if bad:
            raise PipelineError(f"visualize.imagenet_classes must be ImageNet ids in [0, 1000), found {bad[0]!r}")
        object.__setattr__(self, "imagenet_classes", tuple(ids))
        object.__setattr__(self, "classes", tuple(self.classes or ()))


@dataclass(frozen=True)
class EvaluateConfig(Section):
    top_k: Any = (3, 5)

    def __post_init__(self):
        ks = self.top_k if isinstance(self.top_k, (list, tuple)) else [self.top_k]
        if not all(_is_int(k) and k >= 1 for k in ks):
            raise _bad("evaluate.top_k", "a list of whole numbers >= 1", self.top_k)
        object.__setattr__(self, "top_k", tuple(ks))


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
        given = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_config(given, str(path))
