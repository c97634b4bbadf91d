"""The checks every params section uses, and the accepted values of params keys.

Each check raises the one-line error that names the params key, says what is
accepted and what was found.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any

from pipeline.config.reads import Recorded
from pipeline.errors import PipelineError

# The accepted values of params keys whose meaning lives elsewhere: kept here,
# with the checks, so that reading params.yaml depends on no stage's code
# (a test checks each tuple against the module that implements it).
SOURCES = ("cats-vs-dogs", "folder", "oxford-iiit-pet")  # pipeline.data.sources
ENGINES = ("local", "ray")  # pipeline.extract.stage.ENGINES and pipeline.finetune.stage's launchers
DECODERS = ("auto", "pillow", "pillow-exact", "pillow-tensor", "torchvision")  # pipeline.extract.decode
PARAMETERISATIONS = ("fourier", "pixel")  # pipeline.visualize.param
#: Model files of the layout before model folders (pickles): refused with the folder to use instead.
OLD_MODEL_SUFFIXES = (".pt", ".json", ".joblib")
#: The kinds of head (pipeline.heads.registry.KINDS, which builds them) and the
#: defaults of a head of each kind under ``heads.train``.
HEAD_KINDS = {
    "logreg": {"C": (0.01, 0.1, 1.0), "max_iter": 2000},
    "svm": {"C": (0.00001, 0.0001, 0.001, 0.01), "max_iter": 10000},
}
#: finetune.method: what trains inside the backbone's open part (pipeline.finetune.methods).
METHODS = ("full", "bitfit", "lora", "ssf")
#: finetune.augment.policy: an automatic augmentation policy of torchvision.transforms.v2, or none.
AUGMENT_POLICIES = ("none", "trivialaugment", "randaugment")
# pipeline.runtime (where and how a network runs; here, so that checking params
# never imports torch):
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
#: The precisions of any network: trained, differentiated or only run.
PRECISIONS = ("auto", "fp32", "bf16")
#: ``extract.precision`` also takes int8: a quantized network only runs forward
#: (no gradients, no training), so finetune and visualize cannot use it.
EXTRACT_PRECISIONS = PRECISIONS + ("int8",)

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


def check_grid(name: str, C, key: str | None = None) -> list:
    """``heads.train.<name>.C`` (or the params ``key`` given) as a list of candidates: a positive number or a
    non-empty list of them."""
    iterable = hasattr(C, "__iter__") and not isinstance(C, (str, bytes))
    grid = list(C) if iterable else [C]
    if not grid or not all(_is_num(c) and c > 0 for c in grid):
        raise _bad(key or f"heads.train.{name}.C", "a positive number or a list of them", C)
    return grid


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


def runtime(default, **kw):
    """A field that says where or how fast a stage runs, never what it outputs.

    dvc.yaml does not list such a key under the stage's ``params`` (editing it
    must not re-run a ten-minute extraction), and the test that compares
    each stage's params reads with dvc.yaml accepts it unlisted.
    """
    return dataclasses.field(default=default, metadata={"runtime": True}, **kw)


class Section(Recorded):
    """Base of the sections: building from a mapping checks every key."""

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
        hints = typing.get_type_hints(cls)  # resolves the annotations in the section's own module
        for name, f in fields.items():
            sub = _section_type(hints.get(name))
            if sub is not None:
                kwargs[name] = sub.from_mapping(given.get(name), f"{where}.{name}", source)
            elif name in given:
                kwargs[name] = given[name]
        section = cls(**kwargs)
        object.__setattr__(section, "_where", where)  # its key path, for the reads' record
        return section

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def learned_dict(self) -> dict:
        """:meth:`to_dict` without the ``runtime`` keys: what changes the outputs, nothing of where they run."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_") or f.metadata.get("runtime"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value = value.learned_dict()
                if not value:  # a section of runtime keys only (finetune.ray)
                    continue
            out[f.name] = value
        return out


def _section_type(t):
    return t if isinstance(t, type) and issubclass(t, Section) else None


def check_precision(setting, key: str, accepted: tuple = PRECISIONS) -> None:
    """Refuse a precision ``key`` does not accept, saying why int8 is refused where it is."""
    if setting in accepted:
        return
    if setting == "int8":
        raise PipelineError(f"{key} cannot be int8: int8 is for extract.precision only (a quantized network "
                            f"runs forward only; {key.split('.')[0]} needs gradients); "
                            f"accepted: {', '.join(accepted)}")
    raise PipelineError(f"unknown {key} '{setting}'; accepted: {', '.join(accepted)}")
