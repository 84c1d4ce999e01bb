"""Every lrpc module imports on its own in a fresh interpreter, and no two modules import each other, even
through a function-local import (a static check over every `import` statement, wherever it stands)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

import lrpc
import lrpc.passes

FOLDERS = {"lrpc": Path(lrpc.__file__).parent, "lrpc.passes": Path(lrpc.passes.__file__).parent}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The lrpc modules `name` imports anywhere in its source (relative imports resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycle():
    found = modules()
    graph = nx.DiGraph()
    for name, path in found.items():
        graph.add_node(name)
        for target in imported(name, path, set(found)):
            if not (name.startswith(target + ".")):   # a package's modules may import the package (__init__)
                graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports_alone(name):
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, capture_output=True, timeout=120)
