"""The rooms stay apart, read from the source (no imports run): the runtime (streamtsm/engine) never imports the
exporter (streamtsm/export), and no module, in the package, tools or tests, reaches for another module's private
(``_``-prefixed) names, by ``from x import _y`` or by ``x._y`` on a module it imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("streamtsm", "tools", "tests")


def _module_name(path: Path) -> str:
    """``streamtsm/engine/base.py`` -> ``streamtsm.engine.base``; tools are scripts run beside each other, so
    ``tools/benchlib.py`` is the top-level module ``benchlib`` (what ``from benchlib import ...`` names)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "tools":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _sources() -> dict[str, tuple[Path, ast.Module]]:
    """Every project module: name -> (path, parsed source)."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imported_module(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` reads, relative levels resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, tree: ast.Module):
    """``(line, imported module, names)`` of every import statement; names is () for ``import x``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, _imported_module(module, path, node), tuple(a.name for a in node.names)


def _module_aliases(module: str, path: Path, tree: ast.Module, known: set[str]) -> dict[str, str]:
    """Local name -> project module it is bound to by an import (``import a.b as m``, ``from a import b``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _imported_module(module, path, node)
            for alias in node.names:
                full = f"{source}.{alias.name}" if source else alias.name
                if full in known:
                    aliases[alias.asname or alias.name] = full
    return {name: target for name, target in aliases.items() if target in known or target == "streamtsm"}


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ``["a", "b", "c"]``; None for anything but names joined by attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _private_uses(module: str, path: Path, tree: ast.Module, known: set[str]) -> list[str]:
    found = []
    for line, source, names in _imports(module, path, tree):
        if source in known:
            found += [f"{path.relative_to(ROOT)}:{line} imports {n} from {source}" for n in names if _is_private(n)]
    aliases = _module_aliases(module, path, tree, known)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        parts = _dotted(node.value)
        if parts is None or parts[0] not in aliases:
            continue
        target = ".".join([aliases[parts[0]], *parts[1:]])
        if target in known and target != module:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    return found



def test_layering_engine_never_imports_export():
    found = []
    for module, (path, tree) in _sources().items():
        if not module.startswith("streamtsm.engine"):
            continue
        for line, source, names in _imports(module, path, tree):
            targets = [source, *(f"{source}.{n}" for n in names)]
            if any(t == "streamtsm.export" or t.startswith("streamtsm.export.") for t in targets):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {source}")
    assert not found, "the runtime imports the exporter (put what both need in streamtsm.formats):\n" + "\n".join(
        found)


def test_layering_no_module_uses_another_modules_private_names():
    known = set(_sources())
    found = [use for module, (path, tree) in _sources().items() for use in _private_uses(module, path, tree, known)]
    assert not found, "private names used across modules (make them public, or move them):\n" + "\n".join(found)


def test_layering_checks_see_what_they_look_for(tmp_path):
    # The two checks on a made-up module, so that a green run means "nothing found", not "nothing looked at".
    source = ("from .onnx import _clips, export_onnx\n"
              "from streamtsm.export import onnx as onnx_export\n"
              "import streamtsm.export.triton as tx\n"
              "onnx_export._clips(None)\n"
              "tx._swap_in\n"
              "export_onnx._private_attribute_of_a_function\n")
    path = ROOT / "streamtsm" / "export" / "probe.py"
    tree = ast.parse(source)
    known = {"streamtsm.export", "streamtsm.export.onnx", "streamtsm.export.triton"}
    found = _private_uses("streamtsm.export.probe", path, tree, known)
    assert sorted(f.split(" ", 1)[1] for f in found) == [
        "imports _clips from streamtsm.export.onnx",
        "uses streamtsm.export.onnx._clips",
        "uses streamtsm.export.triton._swap_in",
    ]
    imports = list(_imports("streamtsm.engine.probe", ROOT / "streamtsm" / "engine" / "probe.py",
                            ast.parse("from ..export.onnx import BATCH\nfrom .. import export\n")))
    assert [(source, names) for _, source, names in imports] == [("streamtsm.export.onnx", ("BATCH",)),
                                                                 ("streamtsm", ("export",))]


def test_layering_formats_imports_without_torch_or_onnx():
    code = ("import streamtsm.formats, sys; bad = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
