"""The ``visualize`` stage: what the trained model looks for, and how easily it is fooled.

Three views of the model drawn with (``visualize.model``: the fine-tuned network by
default, or a head on its backbone), one differentiable torch model on pixels
(:mod:`pipeline.visualize.networks`), each in its own module:

* **ideal class images** (:mod:`pipeline.visualize.ideal`), judged by an
  independent network for ImageNet classes;
* **adversarial examples** (:mod:`pipeline.visualize.attack`): targeted PGD
  from correctly classified test photos, optionally transferred to a second network;
* **feature maps** (:mod:`pipeline.visualize.feature_maps`) of a few test photos.

Test photos are the manifest's test rows (``data/prepared``), read through the
content-checked image path; the feature cache is not needed.

Outputs under ``out_dir`` (``reports/visualize``)::

    ideal.json              per class: target_prob, total_variation, judge_prob, judge_rank, judge_top1
    ideal_grid.png          every ideal image, captioned
    ideal/<class>.png       one per class (head classes by name, ImageNet ones as in<id>_<name>)
    attack.json             per ε: success_rate, mean_target_prob, n_images (+ transfer)
    attack.csv              eps, success_rate, mean_target_prob (a DVC linear plot)
    attack/<k>_{original,adversarial,difference}.png   at the largest ε
    feature_maps/<k>_<class>.png

Example:
    >>> run_visualize(load_config("params.yaml"))     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.backbones import load_backbone
from pipeline.config import AttackConfig, Config
from pipeline.data.manifest import read_prepared
from pipeline.errors import PipelineError
from pipeline.runtime import Placement, place
from pipeline.serve.bundle import load_bundle
from pipeline.visualize.attack import correctly_classified, run_attack
from pipeline.visualize.feature_maps import draw_feature_maps
from pipeline.visualize.ideal import Group, draw_ideal
from pipeline.visualize.networks import (
    head_model,
    imagenet_categories,
    imagenet_model,
)


def _what(bundle) -> str:
    """The model drawn with, in words: ``the logreg head`` or ``the fine-tuned network``."""
    return f"the {bundle.name} head" if bundle.kind == "head" else "the fine-tuned network"


def _head_classes(names, classes: list[str], what: str) -> tuple[int, ...]:
    """``visualize.classes`` as indices of the model's classes; all of them when empty."""
    if not names:
        return tuple(range(len(classes)))
    out = []
    for n in names:
        if isinstance(n, int) and not isinstance(n, bool):
            raise PipelineError(
                f"visualize.classes takes class names of {what}; put ImageNet id {n} "
                "in visualize.imagenet_classes"
            )
        if n not in classes:
            raise PipelineError(f"visualize.classes names '{n}', not a class of {what}; classes: {classes}")
        out.append(classes.index(n))
    return tuple(out)


def _class_index(name: str, classes: list[str], key: str, default: int) -> int:
    if name in ("", None):
        return default
    if name not in classes:
        raise PipelineError(f"visualize.attack.{key} '{name}' is not a class of the model; classes: {classes}")
    return classes.index(name)


def _source_target(a: AttackConfig, classes: list[str]) -> tuple[int, int]:
    source = _class_index(a.source, classes, "source", 0)
    target = _class_index(a.target, classes, "target", (source + 1) % len(classes))
    if source == target:
        raise PipelineError(f"visualize.attack.source and target are both '{classes[source]}'; pick two classes")
    return source, target


def _transfer(a: AttackConfig, classes: list[str], compute: Placement) -> nn.Module | None:
    """The second network of ``attack.transfer_to`` + ``transfer_head`` on pixels, or None."""
    if not a.transfer_to:
        return None
    tb = load_backbone(a.transfer_to, "DEFAULT", key="visualize.attack.transfer_to")
    bundle = load_bundle(a.transfer_head, expected=dict(tb.provenance(), classes=classes))
    return head_model(bundle).to(compute.device)


def run_visualize(cfg: Config, *, prepared_dir="data/prepared", out_dir="reports/visualize",
                  progress: bool = True) -> dict:
    """The ``visualize`` stage: ideal class images, adversarial examples, feature maps.

    Args:
        cfg: the configuration; reads ``backbone`` and ``visualize``. The model
            drawn with is the file ``visualize.model``: by default the fine-tuned
            network, whose inputs are not ``heads.*``, so tuning a head never
            re-runs this stage.
        prepared_dir: the prepare stage's output.
        out_dir: where the outputs go (``reports/visualize``).

    Returns:
        ``{"ideal": ..., "attack": ...}``, the contents of ideal.json and attack.json.

    Raises:
        PipelineError: a missing or stale model (made with another backbone,
            weights, transform or class list), a class that the model does not
            have, or a bad setting.
    """
    v, a = cfg.visualize, cfg.visualize.attack
    out_dir = Path(out_dir)
    compute = place(v.device, v.precision, section="visualize")  # once, for every network of the stage
    dev = compute.device
    prepared = read_prepared(prepared_dir)
    bb = load_backbone(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.input_size)
    imagenet = imagenet_model(bb).to(dev) if v.imagenet_classes else None  # refuses weights without a classifier
    bundle = load_bundle(v.model, expected=dict(bb.provenance(), classes=prepared.classes))
    classes, what = bundle.classes, _what(bundle)
    head_ids = _head_classes(v.classes, classes, what)
    source, target = _source_target(a, classes)
    hmodel = head_model(bundle).to(dev)
    print(f"visualize: {what} ({v.model}, {bb.name}, {len(classes)} classes) on {compute.describe()}",
          flush=True)

    # Everything that can fail on a setting is loaded before the long optimisations.
    test, pixels = prepared.split("test"), bb.transform_spec.pixels()
    candidates = [r for r in test if r.label == source]
    _, x0 = correctly_classified(hmodel, prepared.root, candidates, pixels, source, a.max_images, compute)
    if x0 is None:
        raise PipelineError(
            f"no test image of class '{classes[source]}' is classified correctly by {what} "
            f"({len(candidates)} test images of that class); nothing to attack: set visualize.attack.source"
        )
    judge = None
    if v.imagenet_classes and v.judge:
        judge = imagenet_model(load_backbone(v.judge, "DEFAULT", key="visualize.judge"), "visualize.judge").to(dev)
    transfer = _transfer(a, classes, compute)

    groups = [Group(hmodel, head_ids, tuple(classes), imagenet=False)]
    if imagenet is not None:
        groups.append(Group(imagenet, v.imagenet_classes, tuple(imagenet_categories()), imagenet=True))
    ideal = draw_ideal(groups, v, size=bb.transform_spec.crop, judge=judge, compute=compute, out_dir=out_dir,
                       progress=progress)
    attack = run_attack(hmodel, x0, classes=classes, source=source, target=target, a=a, seed=v.seed,
                        head=bundle.name, transfer=transfer, compute=compute, out_dir=out_dir, progress=progress)
    # The maps of the network drawn with: a fine-tuned backbone's own filters, not the pretrained ones.
    draw_feature_maps(hmodel.network.features, bb.transform_spec, prepared.root, test, pixels, v.feature_maps,
                      classes, compute, out_dir)
    return {"ideal": ideal, "attack": attack}
