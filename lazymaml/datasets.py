"""Few-shot classification tasks from class-indexed images, shipped or on disk.

An :class:`ImageClasses` holds images grouped by class (uint8, ``(n_c, C, H, W)`` per class) and
samples N-way k-shot tasks from them: N classes drawn without replacement, labelled 0…N−1 in the
order drawn, and for each ``shots`` support and ``queries`` query images drawn without
replacement — a :class:`gradcheck.task.Task` with cross-entropy loss, inputs float32 in [0, 1].
Every task of one sampler has the same shapes, so a meta-batch can be ``Task.stack``-ed. Sampling
draws only from the ``torch.Generator`` it is given: a seed fixes the tasks.

Sources (nothing is downloaded):

* :func:`digits` — scikit-learn's bundled 8×8 handwritten digits (1,797 images) in the Omniglot
  manner: each (digit, rotation by 0/90/180/270°) is a class; the digits whose half-turn looks
  like themselves are merged with it; disjoint meta-train / meta-validation / meta-test classes
  by :data:`DIGIT_SPLITS` (see there for the rule and the measurements behind it);
* :func:`from_folder` — the layouts users already have: Omniglot's ``alphabet/character/*.png``,
  class folders (``images/<class>/*.jpg``), ``train``/``val``/``test`` folders of class folders,
  or miniImageNet's CSV splits (``train.csv``/``val.csv``/``test.csv`` of ``filename,label`` with
  an ``images/`` folder); :func:`rotations` adds the Omniglot rotation classes.

scikit-learn and Pillow are optional (``pip install 'lazymaml[bench]'``), imported on first use.
"""

from __future__ import annotations

import csv
import importlib
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradcheck.task import Task

__all__ = [
    "DIGIT_SPLITS",
    "HALF_TURN_SYMMETRIC",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "ImageClasses",
    "digits",
    "from_folder",
    "rotations",
    "split_classes",
]

SPLITS = ("train", "val", "test")

DIGIT_SPLITS: dict[str, tuple[int, ...]] = {"train": (0, 1, 2, 6, 8, 9), "val": (4, 5), "test": (3, 7)}
"""Which digits' classes form each split. The rule: a digit's rotations never straddle splits
(a test class must not be a rotated training class), and 6 and 9 — each roughly the other turned
half-way — share a split. Meta-test and meta-validation take two digits each, i.e. 8 classes of
four rotations; meta-train the other six (18 classes, the merged ones among them).

Measured with a nearest-neighbour classifier on raw pixels between every two of the 40
(digit, rotation) classes: leave-one-out accuracy is 0.83–0.89 for a digit against its own
half-turn when the digit is 0, 1 or 8, and ≥ 0.96 for every other pair (with one example per
class, 0.57–0.66 against ≥ 0.70). 6 against 9 turned half-way is ≥ 0.99 (one example: 0.77), so
the 6/9 rule is a precaution for this data set rather than a necessity."""

HALF_TURN_SYMMETRIC: tuple[int, ...] = (0, 1, 8)
"""Digits merged with their half-turn (see :data:`DIGIT_SPLITS`): ``0@0+180`` and ``0@90+270``
instead of four classes, so that no task asks to tell an 8 from an upside-down 8. 10 digits give
7 × 4 + 3 × 2 = 34 classes."""

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
)


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ImageClasses:
    """Images grouped by class: ``images[i]`` (uint8, ``(n_i, C, H, W)``) are of class ``names[i]``."""

    names: tuple[str, ...]
    images: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} class names for {len(self.images)} image tensors")
        if len(set(self.names)) != len(self.names):
            raise ValueError("class names must be unique")
        if not self.names:
            raise ValueError("no classes")
        shapes = {tuple(x.shape[1:]) for x in self.images}
        bad = [
            n for n, x in zip(self.names, self.images) if x.dtype != torch.uint8 or x.ndim != 4 or not len(x)
        ]
        if bad or len(shapes) != 1:
            raise ValueError(
                f"every class needs a non-empty uint8 tensor (n, C, H, W) of one image shape; "
                f"classes {bad[:5]} are not, image shapes seen: {sorted(shapes)}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images[0].shape[1:]
        return c, h, w

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, names: Iterable[str]) -> ImageClasses:
        """The classes called ``names``, in that order."""
        index = {n: i for i, n in enumerate(self.names)}
        names = tuple(names)
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"unknown classes {unknown[:5]}")
        return ImageClasses(names, tuple(self.images[index[n]] for n in names))

    def task(self, generator: torch.Generator, ways: int = 5, shots: int = 1, queries: int = 15) -> Task:
        """One ``ways``-way ``shots``-shot task with ``queries`` query images per class.

        Support and query are ordered by label (``arange(ways).repeat_interleave(shots)``); which
        class gets which label, and which images are drawn, comes from ``generator`` only.
        """
        self._check(ways, shots, queries)
        chosen = torch.randperm(len(self.names), generator=generator)[:ways].tolist()
        support, query = [], []
        for c in chosen:
            images = self.images[c]
            drawn = images[torch.randperm(len(images), generator=generator)[: shots + queries]]
            support.append(drawn[:shots])
            query.append(drawn[shots:])

        def batch(parts: list[Tensor], per_class: int) -> tuple[Tensor, Tensor]:
            return torch.cat(parts).float() / 255, torch.arange(ways).repeat_interleave(per_class)

        return Task(batch(support, shots), batch(query, queries), F.cross_entropy)

    def tasks(self, count: int, seed: int, ways: int = 5, shots: int = 1, queries: int = 15) -> list[Task]:
        """``count`` tasks drawn in turn from one generator seeded with ``seed``: fixed by the seed."""
        generator = torch.Generator().manual_seed(seed)
        return [self.task(generator, ways, shots, queries) for _ in range(_positive(count, "count"))]

    def _check(self, ways: int, shots: int, queries: int) -> None:
        _positive(ways, "ways"), _positive(shots, "shots"), _positive(queries, "queries")
        if ways > len(self.names):
            raise ValueError(f"{ways}-way tasks need at least {ways} classes, there are {len(self.names)}")
        small = [f"{n} ({len(x)})" for n, x in zip(self.names, self.images) if len(x) < shots + queries]
        if small:
            raise ValueError(
                f"{shots} shots + {queries} queries need {shots + queries} images per class; "
                f"{len(small)} classes have fewer: {', '.join(small[:5])}"
            )


def rotations(classes: ImageClasses, half_turn_symmetric: Collection[str] = ()) -> ImageClasses:
    """Each class turned by 0/90/180/270° (counter-clockwise) as four classes ``name@angle``.

    A class in ``half_turn_symmetric`` gives two: ``name@0+180`` and ``name@90+270``, each with
    the images of both turns. Needs square images.
    """
    _, h, w = classes.shape
    if h != w:
        raise ValueError(f"rotations need square images, got {h}×{w}")
    unknown = sorted(set(half_turn_symmetric) - set(classes.names))
    if unknown:
        raise KeyError(f"half_turn_symmetric names unknown classes {unknown[:5]}")
    names, images = [], []
    for name, x in zip(classes.names, classes.images):
        turned = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
        if name in half_turn_symmetric:
            names += [f"{name}@0+180", f"{name}@90+270"]
            images += [torch.cat(turned[0::2]), torch.cat(turned[1::2])]
        else:
            names += [f"{name}@{90 * k}" for k in range(4)]
            images += turned
    return ImageClasses(tuple(names), tuple(images))


def _optional(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the optional dependency {module.split('.')[0]!r}: pip install 'lazymaml[bench]'"
        ) from error


def digits() -> dict[str, ImageClasses]:
    """scikit-learn's 8×8 digits as rotation classes, split by :data:`DIGIT_SPLITS`.

    Returns ``{"train", "val", "test"}`` → :class:`ImageClasses` of 1×8×8 images (the data's
    0…16 grey levels scaled to 0…255). Needs scikit-learn (bundled data; nothing is fetched).
    """
    data = _optional("sklearn.datasets", "lazymaml.datasets.digits").load_digits()
    pixels = torch.from_numpy(np.rint(data.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    target = torch.from_numpy(data.target)
    symmetric = {str(d) for d in HALF_TURN_SYMMETRIC}
    return {
        split: rotations(
            ImageClasses(tuple(str(d) for d in ds), tuple(pixels[target == d] for d in ds)),
            symmetric & {str(d) for d in ds},
        )
        for split, ds in DIGIT_SPLITS.items()
    }


def _read(paths: Sequence[Path], size: int, channels: int) -> Tensor:
    """Images at ``paths`` as uint8 ``(n, channels, size, size)``: converted, resized (Lanczos)."""
    image = _optional("PIL.Image", "lazymaml.datasets.from_folder")
    mode = {1: "L", 3: "RGB"}[channels]
    out = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        with image.open(path) as img:
            pixels = np.asarray(img.convert(mode).resize((size, size), image.Resampling.LANCZOS))
        out[i] = torch.from_numpy(pixels.reshape(size, size, channels).copy()).permute(2, 0, 1)
    return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path, size: int, channels: int) -> ImageClasses:
    """Every folder under ``root`` that directly holds images is a class, named by its path from root."""
    folders = sorted(
        {p.parent for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    )
    if not folders:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    names = tuple(f.relative_to(root).as_posix() for f in folders)
    return ImageClasses(names, tuple(_read(_images_in(f), size, channels) for f in folders))


def _csv_split(root: Path, split: str, size: int, channels: int) -> ImageClasses:
    """miniImageNet's ``<split>.csv`` (columns ``filename,label``), images in ``root/images``."""
    path = root / f"{split}.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "label"} <= set(rows[0]):
        raise ValueError(f"{path} must have the columns filename,label (miniImageNet's CSV splits)")
    by_label: dict[str, list[Path]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(root / "images" / row["filename"])
    missing = [p for ps in by_label.values() for p in ps if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {path} are missing, e.g. {missing[0]}")
    names = tuple(sorted(by_label))
    return ImageClasses(names, tuple(_read(by_label[n], size, channels) for n in names))


def split_classes(
    classes: ImageClasses, fractions: tuple[float, float, float] = (0.64, 0.16, 0.20)
) -> dict[str, ImageClasses]:
    """Disjoint train/val/test classes: groups in sorted order, cut where the class counts come
    closest to ``fractions`` (every split gets at least one group).

    A group is the classes that share a parent folder (an Omniglot alphabet) when there are at
    least three such folders; otherwise each class is its own group (flat class folders).
    """
    if len(fractions) != 3 or min(fractions) <= 0 or not math.isclose(sum(fractions), 1):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    parents: dict[str, list[str]] = {}
    for name in sorted(classes.names):
        parents.setdefault(name.rpartition("/")[0], []).append(name)
    groups = list(parents.values()) if len(parents) >= 3 else [[n] for n in sorted(classes.names)]
    if len(groups) < 3:
        raise ValueError(f"splitting needs at least 3 classes, got {len(classes)}")
    before = np.cumsum([0] + [len(g) for g in groups])  # before[j]: classes in groups[:j]

    def cut(fraction: float, low: int, high: int) -> int:
        return min(range(low, high + 1), key=lambda j: abs(before[j] - fraction * len(classes)))

    a = cut(fractions[0], 1, len(groups) - 2)
    b = cut(fractions[0] + fractions[1], a + 1, len(groups) - 1)
    parts = (groups[:a], groups[a:b], groups[b:])
    return {s: classes.subset(n for g in part for n in g) for s, part in zip(SPLITS, parts)}


def from_folder(
    root: str | Path, size: int, channels: int = 1, fractions: tuple[float, float, float] = (0.64, 0.16, 0.20)
) -> dict[str, ImageClasses]:
    """Train/val/test classes from a folder, images resized to ``size``×``size``, ``channels`` 1 or 3.

    Layouts, tried in this order:

    * ``root/{train,val,test}.csv`` of ``filename,label`` with the images in ``root/images/``
      (miniImageNet, Ravi & Larochelle's split);
    * ``root/{train,val,test}/`` each holding class folders;
    * class folders anywhere under ``root`` — ``images/<class>/*.jpg``, Omniglot's
      ``images_background/<alphabet>/<character>/*.png`` — split by :func:`split_classes`.
    """
    root = Path(root)
    _positive(size, "size")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if all((root / f"{s}.csv").is_file() for s in SPLITS):
        return {s: _csv_split(root, s, size, channels) for s in SPLITS}
    if all((root / s).is_dir() for s in SPLITS):
        return {s: _class_folders(root / s, size, channels) for s in SPLITS}
    return split_classes(_class_folders(root, size, channels), fractions)
