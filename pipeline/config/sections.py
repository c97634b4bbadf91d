"""One frozen dataclass per params section: its defaults, written once, and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import (
    AUGMENT_POLICIES, DECODERS, ENGINES, METHODS, EXTRACT_PRECISIONS, HEAD_KINDS, OLD_MODEL_SUFFIXES, PARAMETERISATIONS,
    SOURCES, Section, _bad, _choice, _device, _int, _is_int, _is_num, _num, check_grid, check_precision, check_split_params, runtime,
)
from pipeline.config.reads import Recorded
from pipeline.errors import PipelineError
from pipeline.fileio import file_stem


@dataclass(frozen=True)
class DataConfig(Section):
    source: str = "oxford-iiit-pet"  # oxford-iiit-pet | cats-vs-dogs | folder
    folder: str = "data/images"
    download_dir: str = "data/raw"
    test_fraction: float = 0.2
    seed: int = 0
    archive_sha256: str = ""
    exclude: str = ""  # a file of photos prepare leaves out, one manifest path a line; "": none

    def __post_init__(self):
        _choice("data", "source", self.source, SOURCES)
        check_split_params(self.test_fraction, self.seed)
        if not isinstance(self.exclude, str):
            raise _bad("data.exclude", "a file of photos to leave out (e.g. data/exclude.txt) or \"\" for none",
                       self.exclude)


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
    # Where the Ray engine runs, never what it computes: the same rows as the local engine.
    address: str = runtime("")
    num_gpus_per_worker: float = runtime(0)
    concurrency: int = runtime(2)

    def __post_init__(self):
        _ray_address("extract.ray.address", self.address)
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise _bad("extract.ray.concurrency", "a positive integer (actors)", self.concurrency)
        if not _is_num(self.num_gpus_per_worker) or self.num_gpus_per_worker < 0:
            raise _bad("extract.ray.num_gpus_per_worker", "0 (CPU actors) or a positive number",
                       self.num_gpus_per_worker)


@dataclass(frozen=True)
class FinetuneRayConfig(Section):
    # Where finetune.engine: ray trains, never what: the same global batches as one process.
    address: str = runtime("")
    cpus_per_worker: float = runtime(1)
    max_failures: int = runtime(2)  # workers lost before the run is given up (each restart resumes)

    def __post_init__(self):
        _ray_address("finetune.ray.address", self.address)
        _num("finetune.ray", "cpus_per_worker", self.cpus_per_worker)
        _int("finetune.ray", "max_failures", self.max_failures)


def _ray_address(key: str, address) -> None:
    if not isinstance(address, str):
        raise PipelineError(
            f"{key} must be a string ('' to start a local Ray, 'auto' or "
            f"'ray://host:10001' to join a cluster), found {address!r}"
        )


@dataclass(frozen=True)
class ExtractConfig(Section):
    # precision and decoder change the features; the rest says where and how fast they are computed.
    batch_size: int = runtime(32)
    device: str = runtime("auto")
    precision: str = "auto"
    decoder: str = "auto"
    decode_threads: int = runtime(2)
    compile: Any = runtime("auto")
    store: str = runtime("data/cache/features")
    flush_every: int = runtime(256)
    engine: str = runtime("local")
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise PipelineError(f"extract.batch_size must be a positive integer, found {self.batch_size!r}")
        _device("extract", self.device)
        check_precision(self.precision, "extract.precision", EXTRACT_PRECISIONS)
        _choice("extract", "decoder", self.decoder, DECODERS)
        _int("extract", "decode_threads", self.decode_threads, lo=1)
        _choice("extract", "compile", self.compile, ("auto", True, False))
        _int("extract", "flush_every", self.flush_every, lo=1)
        _choice("extract", "engine", self.engine, ENGINES)


@dataclass(frozen=True)
class HeadConfig(Section):
    """``heads.train.<name>``: one head: its kind, its C grid and its iteration cap.

    Unset values take the kind's defaults (:data:`~pipeline.config.checks.HEAD_KINDS`);
    ``kind`` defaults to the head's name (``logreg: {}`` is a logistic regression).
    """

    kind: str = ""
    C: Any = None
    max_iter: int | None = None

    def check(self, name: str) -> "HeadConfig":
        """This head's settings with its kind's defaults filled in, checked."""
        where = f"heads.train.{name}"
        kind = self.kind or name
        if kind not in HEAD_KINDS:
            raise PipelineError(f"{where}.kind must be one of {', '.join(HEAD_KINDS)}, found {kind!r}"
                                + ("" if self.kind else " (taken from the head's name: set kind)"))
        grid = check_grid(name, HEAD_KINDS[kind]["C"] if self.C is None else self.C)
        max_iter = HEAD_KINDS[kind]["max_iter"] if self.max_iter is None else self.max_iter
        _int(where, "max_iter", max_iter, lo=1)
        checked = HeadConfig(kind=kind, C=tuple(float(c) for c in grid), max_iter=int(max_iter))
        object.__setattr__(checked, "_where", where)
        return checked


def _default_heads() -> dict:
    return {kind: HeadConfig().check(kind) for kind in HEAD_KINDS}


@dataclass(frozen=True)
class HeadsConfig(Recorded):
    """``heads``: shared settings, and ``train``: the heads, declared by name (one :class:`HeadConfig` each).

    ``heads.train`` is the one declaration of the heads: dvc.yaml's
    ``foreach`` makes a ``train_heads@<name>`` and an ``evaluate@<name>``
    stage of each entry.
    """

    cv_folds: int = 5
    seed: int = 0
    out_of_core: bool = False
    chunk_rows: int = 65536
    epochs: int = 10
    backbones: Any = ()  # more backbones whose features are concatenated after backbone.name's
    train: dict = field(default_factory=_default_heads)  # name -> HeadConfig

    SHARED = ("cv_folds", "seed", "out_of_core", "chunk_rows", "epochs", "backbones")

    @classmethod
    def from_mapping(cls, given, where="heads", source="params.yaml"):
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise PipelineError(f"params key '{where}' in {source} must be a mapping, found {given!r}")
        accepted = sorted([*cls.SHARED, "train"])
        for key in given:
            if key not in accepted:
                hint = f" (heads are declared under {where}.train)" if key in HEAD_KINDS else ""
                raise PipelineError(f"unknown params key '{where}.{key}' in {source}{hint}; "
                                    f"accepted here: {', '.join(accepted)}")
        train = given.get("train")
        if train is None:
            heads = _default_heads()
        else:
            if not isinstance(train, dict) or not train:
                raise _bad(f"{where}.train", "a mapping of head names to {kind, C, max_iter}", train)
            heads = {}
            for name, body in train.items():
                # The name names the head's files (models/<name>/, reports/metrics_<name>.json).
                if not isinstance(name, str) or not name or file_stem(name) != name or name == "finetune":
                    raise _bad(f"{where}.train key", "a head name of letters, digits, '_', '.', '-' "
                               "(not 'finetune', the fine-tuned network's name)", name)
                heads[name] = HeadConfig.from_mapping(body, f"{where}.train.{name}", source).check(name)
        section = cls(**{k: given[k] for k in cls.SHARED if k in given}, train=heads)
        object.__setattr__(section, "_where", where)
        return section

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

    def head(self, name: str) -> HeadConfig:
        """The head declared as ``heads.train.<name>``."""
        if name not in self.train:
            raise PipelineError(f"no head '{name}' under heads.train in params.yaml; declared: "
                                f"{', '.join(self.train)}")
        return self.train[name]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.SHARED}
        d["train"] = {n: {"kind": h.kind, "C": list(h.C), "max_iter": h.max_iter} for n, h in self.train.items()}
        return d


UNFREEZE = ("none", "last", "all", "progressive")  # pipeline.finetune.network


@dataclass(frozen=True)
class AugmentConfig(Section):
    """``finetune.augment``: what the training photos go through (torchvision.transforms.v2)."""

    crop_scale: Any = (0.25, 1.0)  # RandomResizedCrop's area range
    policy: str = "none"  # AUGMENT_POLICIES
    erasing: float = 0.0  # RandomErasing's probability per photo
    mixup: float = 0.0  # MixUp's alpha; 0 = off
    cutmix: float = 0.0  # CutMix's alpha; 0 = off (with mixup too: one of the two per batch)

    def __post_init__(self):
        w = "finetune.augment"
        scale = self.crop_scale
        if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(_is_num(v) for v in scale)
                and 0 < scale[0] <= scale[1] <= 1):
            raise _bad(f"{w}.crop_scale", "[low, high] with 0 < low <= high <= 1", scale)
        object.__setattr__(self, "crop_scale", (float(scale[0]), float(scale[1])))
        _choice(w, "policy", self.policy, AUGMENT_POLICIES)
        _num(w, "erasing", self.erasing, hi=1, lo_open=False, hi_open=False)
        _num(w, "mixup", self.mixup, lo_open=False)
        _num(w, "cutmix", self.cutmix, lo_open=False)


@dataclass(frozen=True)
class FinetuneConfig(Section):
    unfreeze: str = "last"
    epochs: Any = 3  # or "budget": as many as max_minutes allows, timed on this machine (pipeline.finetune.train)
    batch_size: int = 16
    lr_head: float = 3e-4
    lr_backbone: float = 1e-4
    lr_decay: float = 1.0  # layer-wise: each depth group below the last stage trains at this x the rate above it
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    val_fraction: float = 0.2
    patience: int = 2
    max_minutes: float = 10
    seed: int = 0
    device: str = runtime("auto")
    precision: str = "auto"
    decode_workers: Any = runtime("auto")
    # The warm-start head's C candidates, chosen by cross-validation on the fine-tuning part (never the
    # validation slice); by default the logreg head's grid, written here, not read from heads.*.
    head_C: Any = HEAD_KINDS["logreg"]["C"]
    ema: float = 0.0  # per-step decay of an average of the weights; 0 = off
    tta_flip: bool = False  # score each photo and its mirror image, average the logits
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Validation photos a fine-tuned epoch must get right beyond the warm-start head to replace it.
    beat_head_by: int = 2
    method: str = "full"  # METHODS: what trains inside the open part (pipeline.finetune.methods)
    lora_rank: int = 8  # method lora: the adapters' rank (alpha = rank)
    # Augmented views per training photo whose activations below the part that trains are computed once
    # and trained on for every epoch (pipeline.finetune.cached); 0 = off: every epoch decodes the photos.
    cached_views: int = 0
    # Where it trains, never what it learns (the global batch and schedule are the same
    # on any number of workers): in-process, or Ray Train; torchrun is seen from its environment.
    engine: str = runtime("local")
    workers: int = runtime(1)
    checkpoint_every: int = runtime(0)  # also a checkpoint every this many steps; 0 = after each epoch only
    ray: FinetuneRayConfig = field(default_factory=FinetuneRayConfig)

    def __post_init__(self):
        w = "finetune"
        _choice(w, "engine", self.engine, ENGINES)
        _choice(w, "method", self.method, METHODS)
        _int(w, "lora_rank", self.lora_rank, lo=1)
        _int(w, "beat_head_by", self.beat_head_by, lo=1)
        _int(w, "cached_views", self.cached_views)
        if self.cached_views and self.unfreeze not in ("none", "last"):
            raise PipelineError(f"finetune.cached_views needs finetune.unfreeze none or last, found "
                                f"'{self.unfreeze}': all and progressive train the layers whose outputs would be "
                                "cached; set cached_views: 0")
        if self.cached_views and self.unfreeze == "none" and self.augment.cutmix:
            raise PipelineError("finetune.augment.cutmix cuts boxes out of images, and with finetune.unfreeze: none "
                                "the cached views are pooled feature vectors; set augment.cutmix: 0 (MixUp works), "
                                "or cached_views: 0")
        if self.method != "full" and self.unfreeze == "none":
            raise PipelineError(f"finetune.method {self.method} adapts the backbone's open part, and "
                                "finetune.unfreeze: none opens none; set unfreeze: last or all, or method: full")
        _int(w, "workers", self.workers, lo=1)
        _int(w, "checkpoint_every", self.checkpoint_every)
        check_grid("logreg", self.head_C, key=f"{w}.head_C")
        _num(w, "ema", self.ema, hi=1, lo_open=False)
        _num(w, "lr_decay", self.lr_decay, hi=1, hi_open=False)
        if not isinstance(self.tta_flip, bool):
            raise _bad(f"{w}.tta_flip", "true or false", self.tta_flip)
        _choice(w, "unfreeze", self.unfreeze, UNFREEZE)
        if self.epochs != "budget" and not (_is_int(self.epochs) and self.epochs >= 0):
            raise _bad(f"{w}.epochs", "a whole number >= 0, or budget (as many as finetune.max_minutes allows)",
                       self.epochs)
        _int(w, "seed", self.seed)
        if self.decode_workers != "auto" and not (_is_int(self.decode_workers) and self.decode_workers >= 0):
            raise _bad(f"{w}.decode_workers", "auto or a whole number >= 0", self.decode_workers)
        _int(w, "batch_size", self.batch_size, lo=1)
        _int(w, "patience", self.patience, lo=1)
        for key in ("lr_head", "lr_backbone", "max_minutes"):
            _num(w, key, getattr(self, key))
        _device(w, self.device)
        check_precision(self.precision, f"{w}.precision")
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
    model: str = "models/finetune"
    param: str = "fourier"
    steps: int = 256
    lr: float = 0.05
    tv_weight: float = 250.0
    l2_weight: float = 20.0
    seed: int = 0
    judge: str = "efficientnet_lite2"
    device: str = runtime("auto")
    precision: str = "auto"
    attack: AttackConfig = field(default_factory=AttackConfig)
    feature_maps: FeatureMapsConfig = field(default_factory=FeatureMapsConfig)

    def __post_init__(self):
        w = "visualize"
        # A path, not a name: dvc.yaml lists it as the stage's dependency as it is.
        if not isinstance(self.model, str) or not self.model.strip() or self.model.endswith(OLD_MODEL_SUFFIXES):
            raise _bad(f"{w}.model", "a model folder: models/finetune (the fine-tuned network) or "
                       "models/<head> (a head of heads.train)", self.model)
        _choice(w, "param", self.param, PARAMETERISATIONS)
        _int(w, "steps", self.steps, lo=1)
        _num(w, "lr", self.lr)
        _num(w, "tv_weight", self.tv_weight, lo_open=False)
        _num(w, "l2_weight", self.l2_weight, lo_open=False)
        _int(w, "seed", self.seed)
        _device(w, self.device)
        check_precision(self.precision, f"{w}.precision")
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
class QualityConfig(Section):
    """``quality``: the audit of the data on the cached features (pipeline.quality).

    The thresholds were calibrated on the sample photos with efficientnet_lite0
    (README, "Look at your data"); each is recorded in reports/quality.json.
    """

    folds: int = 5  # stratified folds of the out-of-fold probabilities, over every photo
    C: float = 0.01  # the logistic regression's C: fixed, an audit chooses nothing on its data
    seed: int = 0
    neighbours: int = 5  # k of the kNN graph: duplicates are searched, outliers scored, among them
    duplicate_similarity: float = 0.9  # cosine similarity at or above which two photos are near-duplicates
    outlier_z: float = 2.2  # an outlier's mean similarity to its neighbours is this many robust SDs below the median

    def __post_init__(self):
        w = "quality"
        _int(w, "folds", self.folds, lo=2)
        _num(w, "C", self.C)
        _int(w, "seed", self.seed)
        _int(w, "neighbours", self.neighbours, lo=1)
        _num(w, "duplicate_similarity", self.duplicate_similarity, hi=1, hi_open=False)
        _num(w, "outlier_z", self.outlier_z)
