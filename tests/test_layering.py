"""Package layering: vlm is the pure model, below data, convert and serve (docs/architecture.md).

Every import statement in a package's files, function-level ones included, is checked against the
packages it may use; an upward import is a package cycle."""
import ast
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
