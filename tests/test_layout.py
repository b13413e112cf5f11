"""The tree shows the architecture: layers that import only downwards, no circles, a numerical core
free of MLflow/Hydra/OmegaConf, one training loop, and a launcher Hydra finds as an installed plugin."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mnist_logreg"
# Lowest first; a module may import its own layer and the ones before it.
LAYERS = [
    {"mnist_logreg", "mnist_logreg.errors", "mnist_logreg.config", "mnist_logreg.project"},
    {"mnist_logreg.ml"},
    {"mnist_logreg.tracking"},
    {"mnist_logreg.lifecycle"},
    {"mnist_logreg.sweep"},
    {"mnist_logreg.analysis"},
    {"mnist_logreg.job", "mnist_logreg.compare", "mnist_logreg.reproduce", "mnist_logreg.spool",
     "mnist_logreg.bench", "mnist_logreg.soak", "mnist_logreg.jax_peer"},
]
SERVICES = "mnist_logreg.services"  # beside the layers: used by soak and the tests, uses none of them


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every mnist_logreg module a file imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("mnist_logreg") and _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer if top != "mnist_logreg"):
            return i
    return 0 if module == "mnist_logreg" else None


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    problems = []
    for name, path in modules().items():
        if name.startswith(SERVICES):
            assert all(m.startswith((SERVICES, "mnist_logreg.project")) for m in imports_of(path)), name
            continue
        own = layer_of(name)
        assert own is not None, f"{name} is in no layer"
        for target in imports_of(path):
            theirs = layer_of(target)
            if target.startswith(SERVICES):
                theirs = len(LAYERS) - 1
            if theirs is not None and theirs > own:
                problems.append(f"{name} (layer {own}) imports {target} (layer {theirs})")
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    graph = {name: {t for t in imports_of(path) if t in modules() and t != name} for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_numerical_core_imports_no_mlflow_hydra_or_omegaconf():
    code = ("import sys, pkgutil, importlib, mnist_logreg.ml as ml\n"
            "for m in pkgutil.iter_modules(ml.__path__): importlib.import_module('mnist_logreg.ml.' + m.name)\n"
            "print(sorted(m for m in ('mlflow', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mxnet_is_imported_without_what_it_never_uses_which_stays_importable():
    """mxnet.model imports scikit-learn when it is installed (here, by mlxtend), 0.4 s: the package's
    import hook keeps it from MXNet's import alone, and anyone else still imports it."""
    pytest.importorskip("sklearn")
    code = ("import sys, mnist_logreg.ml.model, mxnet.model\n"
            "assert 'sklearn' not in sys.modules and not mxnet.model.SKLEARN_INSTALLED\n"
            "import sklearn.base\n"
            "print(mxnet.nd.zeros((2,)).sum().asscalar(), sklearn.base.BaseEstimator.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["0.0", "BaseEstimator"], out.stderr[-2000:]


def test_one_training_loop_and_no_sys_path_edits():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    assert [p.relative_to(ROOT).as_posix() for p, s in sources.items() if "def fit(" in s] == ["mnist_logreg/ml/training.py"]
    assert sum(s.count("def fit(") for s in sources.values()) == 1
    assert not [p for p, s in sources.items() if "sys.path" in s]
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()  # a namespace package, as Hydra's own


def test_hydra_discovers_the_launcher_from_the_installed_environment(tmp_path):
    """Outside the checkout, nothing but the installed environment on the path."""
    code = ("from hydra.core.plugins import Plugins\nfrom hydra.plugins.launcher import Launcher\n"
            "import sys\n"
            "found = [f'{p.__module__}.{p.__name__}' for p in Plugins.instance().discover(Launcher)]\n"
            "print(found)\nprint(sorted(m for m in ('mxnet', 'mlflow') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "hydra_plugins.mnist_logreg_stacked.StackedLauncher" in out[0]
    assert out[1] == "[]"  # the plugin scan imports neither MXNet nor MLflow


def test_the_readme_is_a_front_page_whose_links_exist():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(((?:docs/)[^)#]+)\)", readme)
    pages = {"configuration", "records", "sweeps", "cluster", "compare", "reproduce", "team-server", "performance", "search",
             "development"}
    assert {Path(link).stem for link in links if link.endswith(".md")} == pages
    for link in links:
        assert (ROOT / link).is_file(), link
    for page in (ROOT / "docs").glob("*.md"):  # each page's own links, pictures included
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}"
