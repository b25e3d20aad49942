"""lazymaml.datasets: the digits' class split follows its rule, tasks are right and fixed by a seed,
and the folder layouts give the same kind of tasks.

* The split rule (``DIGIT_SPLITS``) is checked twice: structurally (every class of a digit in one
  split, 6 with 9, the half-turn classes merged exactly for 0, 1 and 8; broken splits are shown to
  be caught) and on the data: leave-one-out nearest-neighbour accuracy between two classes (raw
  pixels) is below 0.9 exactly for the half-turn pairs of 0, 1 and 8 (measured 0.83–0.89; every
  other digit ≥ 0.96, so 0.9 sits in the gap), and ≥ 0.9 between any two classes of different
  splits (measured ≥ 0.98 on the first 60 images of each class).
* Sampled tasks are checked on synthetic classes whose every image encodes (class, index), so that
  labels, disjointness of support and query and the use of the generator can be read off exactly.
* Folder images are written by the test with Pillow as constant images whose grey level or colour
  encodes the class: a constant image stays constant under Lanczos resizing up to rounding, so
  PNG pixels are compared to ±2 levels and JPEG ones (lossy) to ±8.
"""

import builtins
import itertools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from gradcheck import Task
from lazymaml import datasets
from lazymaml.datasets import DIGIT_SPLITS, HALF_TURN_SYMMETRIC, ImageClasses

# ---------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return datasets.digits()


def digit_of(name: str) -> int:
    return int(name.split("@")[0])


def rule_violations(splits: dict[str, ImageClasses]) -> list[str]:
    """What in ``splits`` breaks the digits' split rule (empty: none)."""
    found = []
    names = [n for s in splits.values() for n in s.names]
    if len(set(names)) != len(names):
        found.append("a class is in two splits")
    where = {s: {digit_of(n) for n in c.names} for s, c in splits.items()}
    for d in range(10):
        homes = [s for s, ds in where.items() if d in ds]
        if len(homes) != 1:
            found.append(f"digit {d} is in {homes}")
    if any((6 in ds) != (9 in ds) for ds in where.values()):
        found.append("6 and 9 are in different splits")
    for d in range(10):
        mine = sorted(n.split("@")[1] for n in names if digit_of(n) == d)
        expected = ["0+180", "90+270"] if d in HALF_TURN_SYMMETRIC else ["0", "180", "270", "90"]
        if mine != expected:
            found.append(f"digit {d} has classes {mine}, expected {expected}")
    if {s: tuple(sorted(ds)) for s, ds in where.items()} != DIGIT_SPLITS:
        found.append("the splits are not DIGIT_SPLITS")
    return found


def test_digit_split_follows_the_rule(digits):
    assert rule_violations(digits) == []
    assert {s: len(c) for s, c in digits.items()} == {"train": 18, "val": 8, "test": 8}
    assert all(c.shape == (1, 8, 8) for c in digits.values())


BLANK = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)


def _named(names: dict[str, list[str]]) -> dict[str, ImageClasses]:
    return {s: ImageClasses(tuple(ns), (BLANK,) * len(ns)) for s, ns in names.items()}


def _moved(splits, name, to):
    out = {s: [n for n in c.names if n != name] for s, c in splits.items()}
    out[to].append(name)
    return _named(out)


@pytest.mark.parametrize(
    "name, to, why",
    [
        ("9@180", "test", "6 and 9"),  # a half-turned 9 among the test classes beside a training 6
        ("3@90", "train", "digit 3"),  # a rotation of a test digit in training
        ("5@0", "test", "digit 5"),
    ],
)
def test_broken_splits_are_caught(digits, name, to, why):
    assert any(why in v for v in rule_violations(_moved(digits, name, to)))


def test_unmerged_half_turns_are_caught(digits):
    names = {s: list(c.names) for s, c in digits.items()}
    names["train"] = [n for n in names["train"] if not n.startswith("8@")] + ["8@0", "8@90", "8@180", "8@270"]
    assert any("digit 8 has classes" in v for v in rule_violations(_named(names)))


def test_every_image_in_every_rotation_once(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    for split, ds in DIGIT_SPLITS.items():
        total = sum(len(x) for x in digits[split].images)
        assert total == 4 * sum(int((raw.target == d).sum()) for d in ds)
    first = torch.from_numpy(np.rint(raw.images[raw.target == 3][0] * 255 / 16).astype(np.uint8))
    test = dict(zip(digits["test"].names, digits["test"].images))
    for k in range(4):
        assert torch.equal(test[f"3@{90 * k}"][0, 0], torch.rot90(first, k))


def _loo_nearest_neighbour(a: torch.Tensor, b: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy (raw pixels) telling the images of ``a`` from those of ``b``."""
    x = torch.cat([a, b]).flatten(1).float()
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    d = torch.cdist(x, x).fill_diagonal_(float("inf"))
    return (y[d.argmin(1)] == y).float().mean().item()


def test_the_merged_half_turns_are_the_near_duplicate_ones():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).unsqueeze(1)
    separable = {}
    for d in range(10):
        x = images[torch.from_numpy(data.target == d)]
        separable[d] = _loo_nearest_neighbour(x, torch.rot90(x, 2, dims=(2, 3)))
    assert {d for d, v in separable.items() if v < 0.9} == set(HALF_TURN_SYMMETRIC), separable


def test_no_class_is_a_near_duplicate_of_a_class_in_another_split(digits):
    classes = [(s, n, x[:60]) for s, c in digits.items() for n, x in zip(c.names, c.images)]
    worst = min(
        (_loo_nearest_neighbour(a, b), na, nb)
        for (sa, na, a), (sb, nb, b) in itertools.combinations(classes, 2)
        if sa != sb
    )
    assert worst[0] >= 0.9, worst


def test_digits_needs_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"scikit-learn|sklearn.*lazymaml\[bench\]"):
        datasets.digits()


# ------------------------------------------------------------------------------ task sampling


def coded(classes: int = 7, per_class: int = 30, size: int = 4) -> ImageClasses:
    """Classes whose image j of class c has pixel (0, 0) = c and pixel (0, 1) = j."""
    images = []
    for c in range(classes):
        x = torch.zeros(per_class, 1, size, size, dtype=torch.uint8)
        x[:, 0, 0, 0] = c
        x[:, 0, 0, 1] = torch.arange(per_class)
        images.append(x)
    return ImageClasses(tuple(f"c{c}" for c in range(classes)), tuple(images))


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    codes = torch.round(x[:, 0, 0, :2] * 255).long()
    return [tuple(c) for c in codes.tolist()]


@given(
    ways=st.integers(1, 7),
    shots=st.integers(1, 5),
    queries=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_task_shapes_labels_and_draws(ways, shots, queries, seed):
    classes = coded()
    task = classes.task(torch.Generator().manual_seed(seed), ways, shots, queries)
    assert isinstance(task, Task) and task.loss is F.cross_entropy
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (ways * shots, 1, 4, 4) and xq.shape == (ways * queries, 1, 4, 4)
    assert xs.dtype == torch.float32 and xs.min() >= 0 and xs.max() <= 1
    assert torch.equal(ys, torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(yq, torch.arange(ways).repeat_interleave(queries))
    support, query = decode(xs), decode(xq)
    assert len(set(support + query)) == len(support) + len(query)  # no image drawn twice
    label_class = {}
    for (c, _), label in zip(support + query, torch.cat([ys, yq]).tolist()):
        assert label_class.setdefault(label, c) == c  # one class per label, support and query alike
    assert len(set(label_class.values())) == ways  # distinct classes
    again = classes.task(torch.Generator().manual_seed(seed), ways, shots, queries)
    assert all(
        torch.equal(a, b) for a, b in zip((*task.support, *task.query), (*again.support, *again.query))
    )


def test_tasks_are_fixed_by_the_seed_and_differ_between_seeds():
    classes = coded()
    a, b, other = classes.tasks(20, 7), classes.tasks(20, 7), classes.tasks(20, 8)
    same = [
        torch.equal(s.support[0], t.support[0]) and torch.equal(s.query[0], t.query[0]) for s, t in zip(a, b)
    ]
    assert all(same)
    assert not any(torch.equal(s.support[0], t.support[0]) for s, t in zip(a, other))
    g = torch.Generator().manual_seed(7)
    assert all(torch.equal(t.query[0], classes.task(g).query[0]) for t in a)  # tasks() = task() in turn
    Task.stack(a)  # equal shapes: one batched meta-batch


def test_sampling_covers_every_class_and_label():
    classes = coded()
    seen = set()
    for task in classes.tasks(200, 0):
        seen |= {(c, y) for (c, _), y in zip(decode(task.support[0]), task.support[1].tolist())}
    assert seen == {(c, y) for c in range(7) for y in range(5)}  # every class takes every label


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ways=8), r"8-way tasks need at least 8 classes, there are 7"),
        (dict(shots=25, queries=15), r"need 40 images per class; 7 classes have fewer: c0 \(30\)"),
        (dict(shots=0), r"shots must be a positive integer, got 0"),
        (dict(queries=True), r"queries must be a positive integer, got True"),
    ],
)
def test_bad_task_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coded().task(torch.Generator(), **kwargs)


@pytest.mark.parametrize(
    "names, images, match",
    [
        (("a",), (), r"1 class names for 0 image tensors"),
        (("a", "a"), (torch.zeros(1, 1, 2, 2, dtype=torch.uint8),) * 2, r"unique"),
        (("a", "b"), (torch.zeros(1, 1, 2, 2), BLANK), r"uint8 .* classes \['a'\] are not"),
        (("a", "b"), (BLANK[:, :, :4, :4], BLANK), r"shapes seen: \[\(1, 4, 4\), \(1, 8, 8\)\]"),
        (("a", "b"), (BLANK[:0], BLANK), r"non-empty .* classes \['a'\] are not"),
        (("a",), (BLANK[0],), r"\(n, C, H, W\) .* classes \['a'\] are not"),
    ],
)
def test_bad_image_classes_are_refused(names, images, match):
    with pytest.raises(ValueError, match=match):
        ImageClasses(names, images)


def test_rotations_turn_counter_clockwise_and_merge_half_turns():
    x = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3)
    turned = datasets.rotations(ImageClasses(("a", "b"), (x, x + 10)), half_turn_symmetric={"b"})
    assert turned.names == ("a@0", "a@90", "a@180", "a@270", "b@0+180", "b@90+270")
    got = dict(zip(turned.names, turned.images))
    assert got["a@90"][0, 0].tolist() == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]  # counter-clockwise
    assert torch.equal(got["b@0+180"], torch.cat([x + 10, torch.rot90(x + 10, 2, dims=(2, 3))]))
    with pytest.raises(KeyError, match="unknown classes"):
        datasets.rotations(ImageClasses(("a",), (x,)), half_turn_symmetric={"z"})


# ------------------------------------------------------------------------------------ folders


def write(path, level, mode="L", size=(12, 10)):
    """A constant image: grey ``level`` (mode L) or colour ``level`` (an RGB triple)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, level).save(path)


def levels(classes: ImageClasses) -> dict[str, float]:
    return {n: x.float().mean().item() for n, x in zip(classes.names, classes.images)}


def test_omniglot_layout_keeps_alphabets_together(tmp_path):
    for a, alphabet in enumerate(["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]):
        for c in range(2):
            for i in range(3):
                write(
                    tmp_path / "images_background" / alphabet / f"character{c + 1:02}" / f"{i}.png",
                    20 * a + 5 * c,
                )
    splits = datasets.from_folder(tmp_path, size=8)
    names = {s: set(c.names) for s, c in splits.items()}
    assert set.union(*names.values()) == {
        f"images_background/{a}/character{c:02}"
        for a in ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]
        for c in (1, 2)
    }
    assert sum(map(len, names.values())) == 10  # disjoint
    alphabets = {s: {n.split("/")[1] for n in ns} for s, ns in names.items()}
    assert all(not (alphabets[s] & alphabets[t]) for s, t in itertools.combinations(alphabets, 2))
    assert all(len(c) > 0 for c in splits.values())
    for split in splits.values():
        assert split.shape == (1, 8, 8)
        for name, level in levels(split).items():
            a = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"].index(name.split("/")[1])
            assert abs(level - (20 * a + 5 * (int(name[-2:]) - 1))) <= 2
    task = splits["train"].task(torch.Generator().manual_seed(0), ways=2, shots=1, queries=2)
    assert task.support[0].shape == (2, 1, 8, 8) and task.query[0].shape == (4, 1, 8, 8)


def test_class_folders_rgb(tmp_path):
    colours = {f"n0{c}": (30 * c, 255 - 30 * c, 100) for c in range(8)}
    for name, colour in colours.items():
        for i in range(3):
            write(tmp_path / "images" / name / f"{name}_{i}.jpg", colour, mode="RGB", size=(20, 16))
    splits = datasets.from_folder(tmp_path, size=6, channels=3)
    assert [len(c) for c in splits.values()] == [5, 1, 2]  # 8 classes cut at 0.64 and 0.80 of them
    assert splits["train"].names[0] == "images/n00"
    for split in splits.values():
        assert split.shape == (3, 6, 6)
        for name, x in zip(split.names, split.images):
            expected = torch.tensor(colours[name.split("/")[1]], dtype=torch.float32)
            assert (x.float().mean((0, 2, 3)) - expected).abs().max() <= 8


def test_split_folders(tmp_path):
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        for c in range(count):
            for i in range(2):
                write(tmp_path / split / f"{split}{c}" / f"{i}.png", 10 * c)
    splits = datasets.from_folder(tmp_path, size=4)
    assert {s: c.names for s, c in splits.items()} == {
        "train": ("train0", "train1", "train2"),
        "val": ("val0", "val1"),
        "test": ("test0", "test1"),
    }


def test_mini_imagenet_csv_splits(tmp_path):
    rows = {}
    for split, labels in (
        ("train", ["n01", "n02", "n03"]),
        ("val", ["n04", "n05"]),
        ("test", ["n06", "n07"]),
    ):
        rows[split] = []
        for label in labels:
            for i in range(3):
                filename = f"{label}{i:08}.jpg"
                write(tmp_path / "images" / filename, (int(label[1:]) * 30, 0, 0), mode="RGB")
                rows[split].append(f"{filename},{label}")
        (tmp_path / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows[split]) + "\n")
    splits = datasets.from_folder(tmp_path, size=5, channels=3)
    assert {s: c.names for s, c in splits.items()} == {
        "train": ("n01", "n02", "n03"),
        "val": ("n04", "n05"),
        "test": ("n06", "n07"),
    }
    for split in splits.values():
        for name, x in zip(split.names, split.images):
            assert len(x) == 3 and abs(x[:, 0].float().mean().item() - int(name[1:]) * 30) <= 8
    a = Task.stack(splits["train"].tasks(4, 0, ways=3, shots=1, queries=2))
    assert a.support[0].shape == (4, 3, 3, 5, 5)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        datasets.from_folder(tmp_path / "nothing", size=4)
    with pytest.raises(FileNotFoundError, match="no images"):
        datasets.from_folder(tmp_path, size=4)
    with pytest.raises(ValueError, match=r"channels must be 1 .* or 3"):
        datasets.from_folder(tmp_path, size=4, channels=2)
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="must have the columns filename,label"):
        datasets.from_folder(tmp_path, size=4)
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.csv").write_text("filename,label\na.jpg,n01\n")
    with pytest.raises(FileNotFoundError, match=r"1 images listed in .*train.csv are missing"):
        datasets.from_folder(tmp_path, size=4)


def test_from_folder_needs_pillow(tmp_path, monkeypatch):
    write(tmp_path / "images" / "a" / "0.png", 0)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"'PIL'.*lazymaml\[bench\]"):
        datasets.from_folder(tmp_path, size=4)


def test_split_classes_by_groups_and_fractions():
    flat = coded(10)
    split = datasets.split_classes(flat)
    assert [c.names for c in split.values()] == [tuple(f"c{i}" for i in range(6)), ("c6", "c7"), ("c8", "c9")]
    nested = ImageClasses(
        tuple(f"{g}/{c}" for g in "abcd" for c in range(3 if g == "a" else 1)),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8),) * 6,
    )
    split = datasets.split_classes(nested, (0.4, 0.3, 0.3))
    assert [c.names for c in split.values()] == [("a/0", "a/1", "a/2"), ("b/0",), ("c/0", "d/0")]
    with pytest.raises(ValueError, match="at least 3 classes"):
        datasets.split_classes(coded(2))
    with pytest.raises(ValueError, match="fractions must be three positive numbers summing to 1"):
        datasets.split_classes(flat, (0.5, 0.5, 0.0))


def test_importing_the_module_needs_neither_optional_dependency(monkeypatch):
    real = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] in ("sklearn", "PIL"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    monkeypatch.delitem(sys.modules, "lazymaml.datasets")
    import importlib

    importlib.import_module("lazymaml.datasets")
