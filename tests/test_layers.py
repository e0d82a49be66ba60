"""The layers stay apart: evaluation scores any model without importing training, and production code never builds on
the test helpers (`assistant.testing`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: resolve against the package
            package = path.relative_to(ROOT).parent.parts[: len(path.relative_to(ROOT).parent.parts) - node.level + 1]
            base = ".".join(package + ((node.module,) if node.module else ()))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def offenders(files, banned: str) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if name == banned or name.startswith(banned + ".")
    )


def test_evaluation_never_imports_training():
    assert offenders(sorted((ROOT / "eval").rglob("*.py")), "train") == []


def test_production_code_never_imports_the_test_helpers():
    files = [
        p
        for folder in ("assistant", "train", "eval", "data_prep")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != ROOT / "assistant" / "testing.py"
    ] + sorted(ROOT.glob("*.py"))
    assert offenders(files, "assistant.testing") == []


def test_the_checker_sees_function_level_and_relative_imports():
    """The checks above would pass vacuously if the import finder missed the imports the project writes."""
    module = ROOT / "train" / "build.py"
    names = imported_modules(module)
    assert "assistant.scratch" in names  # a function-level import
    assert "train.config" in names and "train.folders" in names  # relative imports, resolved
