"""The ``visualize`` stage: what the trained model looks for, and how easily it is fooled.

Three views of the backbone + head, composed into one differentiable torch
model (:func:`head_model`: the scaler and linear head fold into one
``nn.Linear``), all built from the parts in :mod:`pipeline.visualize.optvis`:

* **ideal class images**: an image optimised to maximise a class's logit, under
  random jitter, scaling and rotation, with a total-variation and an L2 penalty
  (``visualize.param`` picks pixel or Fourier parameterisation). ImageNet class
  ids use the backbone's own classifier, and an independent judge network
  (``visualize.judge``) says whether it sees that class too;
* **adversarial examples**: targeted PGD from correctly classified test images
  of ``attack.source`` towards ``attack.target``, in pixel space under an L∞
  budget ε, for each ε of ``attack.eps``;
* **feature maps**: the strongest channels of the backbone's last convolutional
  activation, beside the input image.

Outputs under ``out_dir`` (``reports/visualize``)::

    ideal.json              per class: target_prob, total_variation, judge_prob, judge_rank, judge_top1
    ideal_grid.png          every ideal image, captioned
    ideal/<class>.png       one per class (head classes by name, ImageNet ones as in<id>_<name>)
    attack.json             per ε: success_rate, mean_target_prob, n_images (+ transfer)
    attack.csv              eps, success_rate, mean_target_prob (a DVC linear plot)
    attack/<k>_{original,adversarial,difference}.png   at the largest ε
    feature_maps/<k>_<class>.png

Example:
    >>> run_visualize(prepared_dir="data/prepared", features_file="data/features/efficientnet_lite0.h5",
    ...               models_dir="models", backbone="efficientnet_lite0", weights="DEFAULT",
    ...               out_dir="reports/visualize", **DEFAULTS)     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.visualize import optvis
from pipeline.backbones import Backbone, TransformSpec, load_backbone
from pipeline.errors import BadImage, PipelineError
from pipeline.fileio import atomic_path, write_csv, write_json
from pipeline.data.images import load_rgb
from pipeline.params import DEFAULTS as PARAMS_DEFAULTS

#: The ``visualize`` section of params.yaml and its defaults.
DEFAULTS: dict = PARAMS_DEFAULTS["visualize"]

#: Ideal images are optimised this many at a time (one batch).
CHUNK = 8


# ------------------------------------------------------------------------ models


def pixel_transform(spec: TransformSpec):
    """PIL image -> float tensor (3, crop, crop) in [0, 1]: the backbone's resize and crop, no normalisation."""
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(spec.resize, interpolation=T.InterpolationMode(spec.interpolation), antialias=True),
            T.CenterCrop(spec.crop),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


def imagenet_model(bb: Backbone) -> optvis.ImageClassifier:
    """The backbone's full ImageNet network on pixels in [0, 1]: 1000 logits."""
    s = bb.transform_spec
    return optvis.ImageClassifier(bb.features, bb.classifier, s.mean, s.std).eval()


def head_model(bb: Backbone, estimator) -> optvis.ImageClassifier:
    """Backbone + a trained scikit-learn head as one torch model on pixels in [0, 1].

    The head (StandardScaler + linear classifier) folds into one ``nn.Linear``
    (:func:`pipeline.heads.to_torch_linear`). A binary head's logits ``(0, z)``
    are centred to ``(-z/2, z/2)``: same softmax and prediction, but the first
    class's logit is no longer a constant, so its ideal image can be optimised.
    """
    from pipeline.heads.batch import to_torch_linear

    linear = to_torch_linear(estimator)
    s = bb.transform_spec
    binary = linear.out_features == 2 and estimator.named_steps["clf"].coef_.shape[0] == 1
    return optvis.ImageClassifier(bb.features, linear, s.mean, s.std, center_logits=binary).eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in class-id order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ------------------------------------------------------------------ ideal images


def ideal_images(
    model: torch.nn.Module,
    targets: list[int],
    *,
    size: int,
    param: str = "fourier",
    steps: int = 256,
    lr: float = 0.05,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    seed: int = 0,
    transforms=None,
    device="cpu",
    progress: bool = True,
) -> torch.Tensor:
    """One image per target class that maximises ``logit[target] - tv_weight·TV - l2_weight·L2``.

    Args:
        model: pixels in [0, 1] -> logits (:func:`head_model`, :func:`imagenet_model`).
        targets: class indices of ``model``'s output.
        size: the images' side in pixels (the backbone's crop).
        param: ``fourier`` or ``pixel`` (:data:`pipeline.visualize.optvis.PARAMETERISATIONS`).
        transforms: the robustness transforms; default :func:`pipeline.visualize.optvis.standard_transforms`.

    Returns:
        (len(targets), 3, size, size) in [0, 1], on the CPU. Deterministic given
        ``seed`` (and the list of targets: they are optimised in batches of :data:`CHUNK`).
    """
    make = optvis.PARAMETERISATIONS[param]
    transforms = transforms or optvis.standard_transforms()
    out = []
    for start in range(0, len(targets), CHUNK):
        chunk = list(targets[start : start + CHUNK])
        objective = optvis.class_logit(torch.tensor(chunk)) - tv_weight * optvis.total_variation()
        objective = objective - l2_weight * optvis.l2()
        with optvis.seeded(seed + start):
            image = optvis.render(
                model,
                objective,
                make((len(chunk), 3, size, size), device=device),
                transforms=transforms,
                optimizer=optvis.adam(lr),
                steps=steps,
                progress=f"ideal images {start + 1}-{start + len(chunk)} of {len(targets)}" if progress else False,
            )
        out.append(image.cpu())
    return torch.cat(out)


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, images: torch.Tensor, device="cpu", size: int | None = None):
    """Softmax of ``model`` on ``images`` (resized to ``size`` first if given), on the CPU."""
    x = images.to(device)
    if size is not None:
        x = _resize(x, size)
    return model(x).softmax(1).cpu()


def judge_scores(judge: Backbone, images: torch.Tensor, targets: list[int], device="cpu") -> list[dict]:
    """An independent ImageNet network's view of each image: target probability, rank (1 = top), top class.

    The images are resized to the judge's own crop size.
    """
    model = imagenet_model(judge).to(device)
    prob = class_probabilities(model, images, device, size=judge.transform_spec.crop)
    names = imagenet_categories()
    out = []
    for p, t in zip(prob, targets):
        out.append(
            {
                "judge_prob": round(float(p[t]), 6),
                "judge_rank": int((p > p[t]).sum()) + 1,
                "judge_top1": names[int(p.argmax())],
            }
        )
    return out


# ------------------------------------------------------------------------ attack


def pgd_attack(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: int,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Targeted PGD under an L∞ budget, in pixel space [0, 1].

    Maximises the log-probability of ``target`` (minimises its cross-entropy)
    with signed-gradient steps of ``step_size`` (default ``2.5·eps/steps``),
    projecting after each step onto ``|x' - x|∞ <= eps`` and ``[0, 1]``.

    Returns:
        the adversarial batch, same shape and device as ``x``.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    with optvis.seeded(seed):
        return optvis.render(
            model,
            optvis.class_log_prob(target),
            optvis.raw_image(x, random_start=eps if random_start else 0.0),
            optimizer=optvis.sign_gradient(step_size),
            steps=steps,
            constraint=optvis.linf_ball(x, eps),
        )


def attack_rates(model, x_adv: torch.Tensor, target: int, device="cpu", size: int | None = None) -> dict:
    """Share of ``x_adv`` classified as ``target``, and the mean target probability."""
    prob = class_probabilities(model, x_adv, device, size)
    return {
        "success_rate": round(float((prob.argmax(1) == target).float().mean()), 6),
        "mean_target_prob": round(float(prob[:, target].mean()), 6),
        "n_images": int(len(x_adv)),
    }


# ------------------------------------------------------------------ feature maps


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


def feature_map_panel(bb: Backbone, x: torch.Tensor, channels: int = 16, device="cpu") -> tuple[Image.Image, str]:
    """The input image beside its ``channels`` strongest last-conv feature maps.

    Channels are ranked by mean activation; each is scaled to its own
    [min, max] and coloured, and upsampled without interpolation (the cells are
    the real resolution of the map).

    Args:
        x: one image (3, H, W) in [0, 1].

    Returns:
        the panel and the name of the module whose output is shown.
    """
    s = bb.transform_spec
    mean = torch.tensor(s.mean).view(1, 3, 1, 1)
    std = torch.tensor(s.std).view(1, 3, 1, 1)
    name, act = optvis.last_spatial_activation(bb.features.to(device), ((x[None] - mean) / std).to(device))
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


# ------------------------------------------------------------------------ images


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB image."""
    a = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a, "RGB")


def save_png(image: Image.Image | torch.Tensor, path) -> None:
    """Write a PNG atomically."""
    if isinstance(image, torch.Tensor):
        image = to_pil(image)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Images in a grid, each with a one-line caption under it."""
    font = ImageFont.load_default()
    w, h = images[0].size
    cap = 14
    cols = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (w + 4), rows * (h + cap + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (im, text) in enumerate(zip(images, captions)):
        x0, y0 = (k % cols) * (w + 4), (k // cols) * (h + cap + 4)
        grid.paste(im, (x0, y0))
        draw.text((x0 + 2, y0 + h + 1), text[: max(8, w // 6)], fill=(0, 0, 0), font=font)
    return grid


def slug(text: str) -> str:
    """A file-name-safe form of a class name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "class"


@contextlib.contextmanager
def _fresh_dir(path: Path):
    """Yield an empty temporary folder that replaces ``path`` when the block succeeds.

    So a folder of images from an earlier run (other classes, other ε) never
    mixes with this run's, and a failed run leaves the old folder as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------ checks


def _settings(settings: dict) -> dict:
    """``settings`` merged over :data:`DEFAULTS`, each value checked."""
    s = copy.deepcopy(DEFAULTS)
    for key, value in settings.items():
        if key not in s:
            raise PipelineError(f"unknown setting visualize.{key}; accepted: {', '.join(sorted(s))}")
        if isinstance(s[key], dict):
            unknown = set(value or {}) - set(s[key])
            if unknown:
                raise PipelineError(
                    f"unknown setting visualize.{key}.{sorted(unknown)[0]}; accepted: {', '.join(sorted(s[key]))}"
                )
            s[key].update(value or {})
        else:
            s[key] = value

    def positive(value, name, kind=float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or kind(value) != value:
            raise PipelineError(f"visualize.{name} must be a positive {kind.__name__}, found {value!r}")

    def non_negative(value, name, kind=int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or kind(value) != value:
            raise PipelineError(f"visualize.{name} must be a {kind.__name__} >= 0, found {value!r}")

    if s["param"] not in optvis.PARAMETERISATIONS:
        raise PipelineError(
            f"unknown visualize.param '{s['param']}'; accepted: {', '.join(optvis.PARAMETERISATIONS)}"
        )
    positive(s["steps"], "steps", int)
    positive(s["lr"], "lr")
    non_negative(s["tv_weight"], "tv_weight", float)
    non_negative(s["l2_weight"], "l2_weight", float)
    non_negative(s["seed"], "seed")
    a = s["attack"]
    eps = a["eps"] if isinstance(a["eps"], list) else [a["eps"]]
    if not eps or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in eps):
        raise PipelineError(
            f"visualize.attack.eps must be a list of budgets in (0, 1] (8/255 = 0.0314), found {a['eps']!r}"
        )
    a["eps"] = sorted(float(e) for e in eps)
    positive(a["steps"], "attack.steps", int)
    positive(a["max_images"], "attack.max_images", int)
    non_negative(a["save"], "attack.save")
    from pipeline.backbones import REGISTRY

    for key, name in (("judge", s["judge"]), ("attack.transfer_to", a["transfer_to"])):
        if name and name not in REGISTRY:
            raise PipelineError(
                f"unknown backbone '{name}' (visualize.{key}); accepted: {', '.join(sorted(REGISTRY))}, or \"\""
            )
    if bool(a["transfer_to"]) != bool(a["transfer_head"]):
        raise PipelineError("visualize.attack.transfer_to and transfer_head go together: set both or neither")
    non_negative(s["feature_maps"]["images"], "feature_maps.images")
    positive(s["feature_maps"]["channels"], "feature_maps.channels", int)
    return s


def _imagenet_ids(ids) -> list[int]:
    ids = list(ids or [])
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 1000]
    if bad:
        raise PipelineError(f"visualize.imagenet_classes must be ImageNet class ids 0-999, found {bad[0]!r}")
    return ids


def _head_classes(names, classes: list[str], head: str) -> list[int]:
    if not names:
        return list(range(len(classes)))
    out = []
    for n in names:
        if isinstance(n, int) and not isinstance(n, bool):
            raise PipelineError(
                f"visualize.classes takes class names of the {head} head; put ImageNet id {n} "
                "in visualize.imagenet_classes"
            )
        if n not in classes:
            raise PipelineError(f"visualize.classes names '{n}', not a class of the {head} head; classes: {classes}")
        out.append(classes.index(n))
    return out


def _class_index(name: str, classes: list[str], key: str, default: int) -> int:
    if name in ("", None):
        return default
    if name not in classes:
        raise PipelineError(f"visualize.attack.{key} '{name}' is not a class of the head; classes: {classes}")
    return classes.index(name)


def _load_images(root: Path, paths: list[str], transform) -> tuple[list[str], torch.Tensor | None]:
    kept, xs = [], []
    for p in paths:
        try:
            xs.append(transform(load_rgb(root / p)))
            kept.append(p)
        except BadImage as e:
            tqdm.write(f"visualize: skipped {p}: {e.reason}")
    return kept, (torch.stack(xs) if xs else None)


# ------------------------------------------------------------------------- stage


def run_visualize(*, prepared_dir, features_file, models_dir, backbone: str, weights: str, out_dir,
                  device: str = "auto", progress: bool = True, **settings) -> dict:
    """The ``visualize`` stage: ideal class images, adversarial examples, feature maps.

    Args:
        prepared_dir, features_file, models_dir: the earlier stages' outputs.
        backbone, weights: params ``backbone.name`` and ``backbone.weights``.
        out_dir: where the outputs go (``reports/visualize``).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        **settings: the ``visualize`` params section (:data:`DEFAULTS`).

    Returns:
        ``{"ideal": ..., "attack": ...}``, the contents of ideal.json and attack.json.

    Raises:
        PipelineError: a stale feature cache or head (made with another
            backbone, weights, transform or class list), a class that the head
            does not have, or a bad setting.
    """
    from pipeline.data.manifest import read_prepared
    from pipeline.extract.local import read_features, resolve_device
    from pipeline.heads.batch import check_head, load_head

    s = _settings(settings)
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    prepared = read_prepared(prepared_dir)
    bb = load_backbone(backbone, weights)
    expected = dict(bb.provenance(), classes=prepared.classes)
    fs = read_features(features_file, expected)
    head_name = check_head(s["model"])
    bundle = load_head(Path(models_dir) / f"{head_name}.joblib", expected)
    classes = bundle["classes"]
    head_ids = _head_classes(s["classes"], classes, head_name)
    imagenet_ids = _imagenet_ids(s["imagenet_classes"])
    a = s["attack"]
    source = _class_index(a["source"], classes, "source", 0)
    target = _class_index(a["target"], classes, "target", (source + 1) % len(classes))
    if source == target:
        raise PipelineError(f"visualize.attack.source and target are both '{classes[source]}'; pick two classes")

    bb.features.to(dev)
    bb.classifier.to(dev)
    hmodel = head_model(bb, bundle["estimator"]).to(dev)
    crop = bb.transform_spec.crop
    names = imagenet_categories()
    print(f"visualize: {backbone} + {head_name} head ({len(classes)} classes) on {dev}", flush=True)

    # ---- ideal class images
    opt = {k: s[k] for k in ("param", "steps", "lr", "tv_weight", "l2_weight", "seed")}
    images, entries = [], []
    if head_ids:
        x = ideal_images(hmodel, head_ids, size=crop, device=dev, progress=progress, **opt)
        prob = class_probabilities(hmodel, x, dev)
        for i, c in enumerate(head_ids):
            entries.append(dict(kind="head", index=c, name=classes[c], slug=slug(classes[c]), prob=prob[i, c]))
        images.append(x)
    if imagenet_ids:
        inmodel = imagenet_model(bb).to(dev)
        x = ideal_images(inmodel, imagenet_ids, size=crop, device=dev, progress=progress, **opt)
        prob = class_probabilities(inmodel, x, dev)
        for i, c in enumerate(imagenet_ids):
            key = f"in{c}_{slug(names[c])}"
            entries.append(dict(kind="imagenet", index=c, name=names[c], slug=key, prob=prob[i, c]))
        images.append(x)
    images = torch.cat(images) if images else torch.zeros(0, 3, crop, crop)
    judged: dict[int, dict] = {}
    if imagenet_ids and s["judge"]:
        jb = load_backbone(s["judge"], "DEFAULT")
        scores = judge_scores(jb, images[len(head_ids) :], imagenet_ids, dev)
        judged = dict(zip(range(len(head_ids), len(entries)), scores))
    ideal: dict = {}
    with _fresh_dir(out_dir / "ideal") as folder:
        for k, (e, x) in enumerate(zip(entries, images)):
            save_png(x, folder / f"{e['slug']}.png")
            # Kept to numbers where possible: `dvc metrics show` makes a column of every key.
            row = {
                "class": e["name"],
                "target_prob": round(float(e["prob"]), 6),
                "total_variation": round(float(optvis.total_variation_of(x[None])[0]), 6),
                "judge_prob": None,
                "judge_rank": None,
            }
            if k in judged:
                row.update(judged[k])
            elif e["kind"] == "head":
                row["judge_note"] = f"{s['judge'] or 'a judge'}'s ImageNet classifier has no class of this head"
            else:
                row["judge_note"] = "visualize.judge is empty"
            ideal[e["slug"]] = row
    if len(images):
        captions = [
            f"{e['name']} p={ideal[e['slug']]['target_prob']:.2f}"
            + (f" judge#{ideal[e['slug']]['judge_rank']}" if ideal[e["slug"]]["judge_rank"] else "")
            for e in entries
        ]
        save_png(captioned_grid([to_pil(x) for x in images], captions), out_dir / "ideal_grid.png")
    write_json(out_dir / "ideal.json", ideal)

    # ---- adversarial examples
    transform = pixel_transform(bb.transform_spec)
    root = prepared.root
    test = [(p, int(y)) for p, y, sp in zip(fs.paths, fs.labels, fs.splits) if sp == "test"]
    candidates = [p for p, y in test if y == source]
    kept_paths, originals = [], []
    for start in range(0, len(candidates), a["max_images"]):
        paths, x = _load_images(root, candidates[start : start + a["max_images"]], transform)
        if x is None:
            continue
        correct = class_probabilities(hmodel, x, dev).argmax(1) == source
        kept_paths += [p for p, ok in zip(paths, correct) if ok]
        originals += [xi for xi, ok in zip(x, correct) if ok]
        if len(kept_paths) >= a["max_images"]:
            break
    kept_paths, originals = kept_paths[: a["max_images"]], originals[: a["max_images"]]
    if not originals:
        raise PipelineError(
            f"no test image of class '{classes[source]}' is classified correctly by the {head_name} head "
            f"({len(candidates)} test images of that class); nothing to attack: set visualize.attack.source"
        )
    x0 = torch.stack(originals).to(dev)
    transfer = None
    if a["transfer_to"]:
        tb = load_backbone(a["transfer_to"], "DEFAULT")
        tbundle = load_head(a["transfer_head"], dict(tb.provenance(), classes=classes))
        transfer = (head_model(tb, tbundle["estimator"]).to(dev), tb.transform_spec.crop)
    per_eps, rows, adv = {}, [], None
    for eps in tqdm(a["eps"], desc=f"PGD {classes[source]} -> {classes[target]}", disable=not progress):
        adv = pgd_attack(
            hmodel, x0, target, eps=eps, steps=a["steps"], random_start=a["random_start"], seed=s["seed"]
        )
        r = dict(eps=round(eps, 6), **attack_rates(hmodel, adv, target, dev))
        if transfer is not None:
            t = attack_rates(transfer[0], adv, target, dev, size=transfer[1])
            r["transfer_success_rate"] = t["success_rate"]
            r["transfer_fooled"] = int(round(t["success_rate"] * t["n_images"]))
        per_eps[f"{eps * 255:.3g}/255"] = r
        rows.append([r["eps"], r["success_rate"], r["mean_target_prob"]])
    attack = {
        "source": classes[source],
        "target": classes[target],
        "model": head_name,
        "steps": a["steps"],
        "n_images": len(originals),
        "transfer_to": a["transfer_to"] or None,
        "eps": per_eps,
    }
    with _fresh_dir(out_dir / "attack") as folder:
        eps = a["eps"][-1]
        for k in range(min(a["save"], len(originals))):
            o, d = x0[k].cpu(), adv[k].cpu()
            save_png(o, folder / f"{k}_original.png")
            save_png(d, folder / f"{k}_adversarial.png")
            save_png((d - o) / (2 * eps) + 0.5, folder / f"{k}_difference.png")  # ±ε -> black..white
    write_json(out_dir / "attack.json", attack)
    write_csv(out_dir / "attack.csv", ["eps", "success_rate", "mean_target_prob"], rows)

    # ---- feature maps
    fm = s["feature_maps"]
    picks, by_class = [], {}
    for p, y in test:
        by_class.setdefault(y, []).append(p)
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(picks) < fm["images"] and any(queues):  # round-robin over the classes
        for q in queues:
            if q and len(picks) < fm["images"]:
                picks.append(q.pop(0))
    paths, xs = _load_images(root, picks, transform)
    label = dict(test)
    module = None
    with _fresh_dir(out_dir / "feature_maps") as folder:
        for k, (p, x) in enumerate(zip(paths, xs if xs is not None else [])):
            panel, module = feature_map_panel(bb, x, fm["channels"], dev)
            save_png(panel, folder / f"{k}_{slug(classes[label[p]])}.png")

    for name, row in ideal.items():
        judge = f", judge rank {row['judge_rank']} (p={row['judge_prob']:.3f})" if row["judge_rank"] else ""
        print(f"visualize: ideal {name}: p={row['target_prob']:.3f}, TV {row['total_variation']:.3f}{judge}")
    for key, r in per_eps.items():
        print(
            f"visualize: PGD eps={key}: {r['success_rate']:.0%} of {r['n_images']} {classes[source]} images "
            f"now '{classes[target]}' (mean p={r['mean_target_prob']:.3f})"
        )
    if module:
        print(f"visualize: feature maps of '{module}' for {len(paths)} images in {out_dir / 'feature_maps'}")
    return {"ideal": ideal, "attack": attack}
