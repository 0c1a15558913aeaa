"""The package layout (issue #12): moved public modules keep a deprecation shim for one release,
and the floors do not import each other the wrong way."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "captum_normgrad"

SHIMS = {
    "captum_normgrad.metrics": ("captum_normgrad.evaluation", "pointing_game"),
    "captum_normgrad.metrics.adapters": ("captum_normgrad.wrappers", "LayerNoiseTunnel"),
    "captum_normgrad.metrics.localisation": ("captum_normgrad.evaluation.localisation", "energy_pointing_game"),
    "captum_normgrad.metrics.faithfulness": ("captum_normgrad.evaluation.faithfulness", "deletion_curve"),
    "captum_normgrad.sanity": ("captum_normgrad.evaluation.sanity", "model_parameter_randomization"),
}


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_moved_modules_warn_and_forward(old: str) -> None:
    new, name = SHIMS[old]
    for mod in [m for m in sys.modules if m == old or m.startswith(old + ".")] + ["captum_normgrad.metrics"]:
        sys.modules.pop(mod, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        shim = importlib.import_module(old)
    assert getattr(shim, name) is getattr(importlib.import_module(new), name)
    assert name in shim.__all__


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for type checkers only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path) -> set:
    tree = ast.parse(path.read_text())
    out = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent.relative_to(PKG.parent).parts
            base = base[: len(base) - (node.level - 1)]
            out.add(".".join(base + ((node.module,) if node.module else ())))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_floors() -> None:
    """Math knows nothing of the rest; evaluation never imports viz (nor viz the sanity checks):
    similarity measures are shared from evaluation.similarity; nothing imports a shim."""
    maps = _imports(PKG / "_maps.py")
    assert not {m for m in maps if m.startswith("captum_normgrad")}, maps
    for f in (PKG / "evaluation").glob("*.py"):
        imps = _imports(f)
        assert not any(m.startswith("captum_normgrad.viz") for m in imps if f.name != "sanity.py"), f
        assert not any(m.startswith("captum_normgrad.report") for m in imps), f
    viz = _imports(PKG / "viz.py")
    assert not any(m.startswith("captum_normgrad.evaluation.sanity") for m in viz), viz
    shims = set(SHIMS) | {"captum_normgrad.quantus_bridge"}
    for f in PKG.rglob("*.py"):
        rel = ".".join(f.relative_to(PKG.parent).with_suffix("").parts).replace(".__init__", "")
        if rel in shims:
            continue
        assert not (_imports(f) & shims), (f, _imports(f) & shims)
