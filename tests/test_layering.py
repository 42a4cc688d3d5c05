"""Package layering: vlm is the pure model, below data, convert and serve (docs/architecture.md).

Every import statement in a package's files, function-level ones included, is checked against the
packages it may use; an upward import is a package cycle. Inside a package, modules import each
other one way down: two or more modules importing each other (function-level imports count) fail."""
import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = {"vlm", "data", "convert", "serve", "train", "evaluation", "bench", "configs", "tests"}
ALLOWED = {  # package -> project packages it may import (itself always)
    "vlm": set(),
    "data": {"vlm"},
    "convert": {"vlm", "data"},
    "serve": {"vlm", "data", "convert"},
}


def imported_packages(path: pathlib.Path) -> set:
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.add(node.module.split(".")[0])
  return out & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_lower_layers(package):
  bad = {}
  for f in sorted((ROOT / package).rglob("*.py")):
    up = imported_packages(f) - ALLOWED[package] - {package}
    if up:
      bad[str(f.relative_to(ROOT))] = sorted(up)
  assert not bad, f"{package} imports packages above it: {bad}"


def module_graph(root: pathlib.Path, package: str) -> dict:
  """module -> the modules of `package` it imports (anywhere in the file). `from p import m`
  names module p.m when that is a file; a package's __init__ counts only when named itself."""
  files = {}
  for f in (root / package).rglob("*.py"):
    parts = f.relative_to(root).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  graph = {}
  for name, f in files.items():
    here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name in files}
      elif isinstance(node, ast.ImportFrom):
        base = (".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".")
                if node.level else node.module)
        for a in node.names:
          sub = f"{base}.{a.name}"
          deps.add(sub if sub in files else base)
    graph[name] = (deps & set(files)) - {name}
  return graph


def cycle(graph: dict):
  """One import cycle of `graph` as a list of modules, or None."""
  try:
    graphlib.TopologicalSorter(graph).prepare()
  except graphlib.CycleError as e:
    return e.args[1]
  return None


@pytest.mark.parametrize("package", sorted(PROJECT - {"tests"}))
def test_no_import_cycle_inside_a_package(package):
  found = cycle(module_graph(ROOT, package))
  assert found is None, f"modules of {package} import each other: {' -> '.join(found)}"


def test_cycle_check_sees_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from pkg import a\n")
  (pkg / "a.py").write_text("def f():\n  from pkg.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("from .. import c\n")
  (pkg / "c.py").write_text("import os\n")
  assert cycle(module_graph(tmp_path, "pkg")) is None
  (pkg / "c.py").write_text("if True:\n  import pkg.a\n")
  assert set(cycle(module_graph(tmp_path, "pkg"))) == {"pkg.a", "pkg.sub.b", "pkg.c"}
