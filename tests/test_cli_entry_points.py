"""Every command line ends through data.errors.cli_errors (one `error:` line for user errors and a
full / read-only disk, one line and exit 130 for Ctrl-C): a new command that forgets it fails
here. A command is a package's __main__.py or a module with a `__main__` guard."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("vlm", "data", "convert", "serve", "train", "evaluation")   # bench/: benchmarks


def _module_file(name: str) -> pathlib.Path:
  path = ROOT.joinpath(*name.split("."))
  return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _uses_cli_errors(path: pathlib.Path, seen=()) -> bool:
  """The file calls cli_errors, or takes its `main` from a module that does."""
  tree = ast.parse(path.read_text())
  if any(isinstance(n, ast.Name) and n.id == "cli_errors" for n in ast.walk(tree)):
    return True
  for n in ast.walk(tree):
    if isinstance(n, ast.ImportFrom) and n.module and any(a.name == "main" for a in n.names):
      f = _module_file(n.module)
      if f.exists() and f not in seen and _uses_cli_errors(f, (*seen, path)):
        return True
  return False


def commands() -> list:
  found = []
  for package in PACKAGES:
    for f in sorted((ROOT / package).rglob("*.py")):
      text = f.read_text()
      if f.name == "__main__.py" or '__name__ == "__main__"' in text:
        found.append(f)
  return found


def test_every_command_ends_through_cli_errors():
  found = commands()
  assert len(found) >= 12   # the scan itself works
  missing = [str(f.relative_to(ROOT)) for f in found if not _uses_cli_errors(f)]
  assert missing == []
