"""The shape of the public API, pinned: one calling convention, one direction of imports.

* every entry point takes ``(…, model, task_or_tasks, steps, inner_lr, *, …)`` — a checker's
  candidate may come first, entry points that need exactly one task name it ``task``, and a
  learner takes ``(model, steps, inner_lr, *, …)`` and its tasks per call — with
  everything after ``inner_lr`` keyword-only, and every shared option under the same name, with
  the same default and the same annotation everywhere;
* no module of ``gradcheck`` imports ``lazymaml`` (at module level or inside a function);
* every public module declares ``__all__``, and every name in it exists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import gradcheck
import lazymaml
from gradcheck import finite_differences, oracle, validate
from lazymaml import estimators

ROOT = Path(__file__).resolve().parents[1]

# option -> its one default; annotations are compared across entry points below
SHARED = {
    "adapt": None,
    "leap": 1.0,
    "inner_optimizer": "sgd",
    "first_order": False,
    "jacobian_step": "single",
}

ENTRY_POINTS = {
    "oracle.meta_gradient": oracle.meta_gradient,
    "finite_differences.meta_gradient": finite_differences.meta_gradient,
    "finite_differences.meta_objective": finite_differences.meta_objective,
    "finite_differences.check": finite_differences.check,
    "validate": validate,
    "diagnose": gradcheck.diagnose,
    "lazymaml.meta_gradient": lazymaml.meta_gradient,
    "lazymaml.straight_through": lazymaml.straight_through,
    "lazymaml.deviation_bound": lazymaml.deviation_bound,
    "lazymaml.bound_terms": lazymaml.bound_terms,
    "LazyMAML": lazymaml.LazyMAML.__init__,
    "MetaLearner": lazymaml.MetaLearner.__init__,
    **{f"estimators.{name}": getattr(estimators, name) for name in estimators.REGISTRY if name != "lazy"},
}
CANDIDATE_FIRST = {
    "finite_differences.check": "gradient",
    "validate": "candidate_fn",
    "diagnose": "candidate_gradient",
}
SINGLE_TASK = {"lazymaml.straight_through", "lazymaml.bound_terms"}
LEARNERS = {"LazyMAML", "MetaLearner"}  # tasks come later, to meta_backward(task_or_tasks) and adapt(task)


def _positional(name: str, fn) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_positional_arguments_are_model_tasks_steps_inner_lr(name):
    tasks = "task" if name in SINGLE_TASK else "task_or_tasks"
    want = ["model", tasks, "steps", "inner_lr"] if name not in LEARNERS else ["model", "steps", "inner_lr"]
    if name in CANDIDATE_FIRST:
        want = [CANDIDATE_FIRST[name], *want]
    assert _positional(name, ENTRY_POINTS[name]) == want


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_everything_after_inner_lr_is_keyword_only_with_the_shared_defaults(name):
    params = inspect.signature(ENTRY_POINTS[name]).parameters.values()
    rest = [p for p in params if p.name not in {"self", *_positional(name, ENTRY_POINTS[name])}]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), [p.name for p in rest]
    for p in rest:
        if p.name in SHARED:
            assert p.default == SHARED[p.name], f"{name}: {p.name}={p.default!r}"


@pytest.mark.parametrize("option", list(SHARED))
def test_each_shared_option_has_one_annotation(option):
    annotations = {
        name: inspect.signature(fn).parameters[option].annotation
        for name, fn in ENTRY_POINTS.items()
        if option in inspect.signature(fn).parameters
    }
    assert len(set(annotations.values())) == 1, annotations


def test_every_entry_point_shares_the_core_options():
    """adapt, leap and inner_optimizer are accepted by every entry point that takes a model."""
    for name, fn in ENTRY_POINTS.items():
        missing = {"adapt", "leap", "inner_optimizer"} - set(inspect.signature(fn).parameters)
        assert not missing, f"{name} lacks {missing}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):  # every import, also inside functions
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "gradcheck").glob("*.py")), ids=lambda p: p.name)
def test_gradcheck_never_imports_lazymaml(path):
    assert "lazymaml" not in _imports(path)


def _public_modules():
    for package in (gradcheck, lazymaml):
        yield package.__name__
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") or info.name == "__main__":
                yield f"{package.__name__}.{info.name}"


@pytest.mark.parametrize("module", list(_public_modules()))
def test_public_modules_declare_all(module):
    mod = importlib.import_module(module)
    assert hasattr(mod, "__all__"), f"{module} has no __all__"
    assert all(hasattr(mod, name) for name in mod.__all__)


def _is_submodule(package, name: str) -> bool:
    """Whether ``package.name`` is a module (importable whether or not something imported it yet)."""
    return hasattr(package, "__path__") and importlib.util.find_spec(f"{package.__name__}.{name}") is not None


def _python_source(path: Path) -> str:
    """The Python in a notebook's code cells, a README's ```python blocks, or a script."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    if path.suffix == ".md":
        return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL))
    return path.read_text()


@pytest.mark.parametrize(
    "path",
    [
        *sorted((ROOT / "notebooks").glob("*.ipynb")),
        *sorted((ROOT / "benchmarks").glob("*.py")),
        *sorted((ROOT / "examples").glob("*.py")),
        ROOT / "README.md",
    ],
    ids=lambda p: p.name,
)
def test_notebooks_benchmarks_examples_and_readme_import_only_public_names(path):
    source = _python_source(path)
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0]
            in (
                "gradcheck",
                "lazymaml",
            )
        ):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            module = importlib.import_module(node.module)
            for alias in node.names:
                public = getattr(module, "__all__", [])
                assert alias.name in public or _is_submodule(module, alias.name), (
                    f"{path.name}: {node.module}.{alias.name}"
                )
