"""``docs/architecture.md`` stays true to the package tree.

* every module of ``ntk_callback`` (read from the files on disk) has a row in the module
  map, and every row names a module that exists;
* every import of one package module by another is allowed by the importer's
  "may import" column (read from the source with ``ast``, never by importing it);
* the engine and the analysis layer import no Lightning.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ntk_callback"
DOC = ROOT / "docs" / "architecture.md"

# a map row: | `path.py` | what it owns | `allowed`, `names` or — |
ROW = re.compile(r"^\|\s*`([\w/]+\.py)`\s*\|(.*)\|(.*)\|\s*$")


def module_name(path: Path) -> str:
    """``engine/structured/rules.py`` -> ``engine/structured/rules``; a package's
    ``__init__.py`` is named by its folder (``""`` for the package itself)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return "/".join(parts)


def package_modules() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE)): p for p in sorted(PACKAGE.rglob("*.py"))
            if "__pycache__" not in p.parts}


def doc_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} has two rows in {DOC.name}"
            rows[m.group(1)] = re.findall(r"`([\w/*]+)`", m.group(3))
    return rows


def internal_imports(path: Path) -> set[str]:
    """Package modules imported by ``path`` (absolute or relative), as module names."""
    here = module_name(path)
    is_pkg = path.name == "__init__.py"
    base = here.split("/") if here else []
    if not is_pkg:
        base = base[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - (node.level - 1)] if node.level > 1 else list(base)
                target = parts + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ntk_callback":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = "/".join(target + [alias.name])
                if (PACKAGE / f"{sub}.py").exists() or (PACKAGE / sub / "__init__.py").exists():
                    found.add(sub)
                else:
                    found.add("/".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ntk_callback":
                    found.add("/".join(alias.name.split(".")[1:]))
    found.discard(here)
    return found


def allowed(name: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.endswith("/*"):
            folder = pat[:-2]
            if name.startswith(folder + "/") and "/" not in name[len(folder) + 1:]:
                return True
        elif name == pat:
            return True
    return False


def test_every_module_has_a_row_and_every_row_a_module() -> None:
    rows, modules = doc_rows(), package_modules()
    missing = sorted(set(modules) - set(rows))
    stale = sorted(set(rows) - set(modules))
    assert not missing, f"modules without a row in docs/architecture.md: {missing}"
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


@pytest.mark.parametrize("rel", sorted(package_modules()))
def test_imports_follow_the_map(rel: str) -> None:
    patterns = doc_rows().get(rel)
    if patterns is None:
        pytest.skip("no row (reported by the test above)")
    path = package_modules()[rel]
    bad = sorted(m for m in internal_imports(path) if m and not allowed(m, patterns))
    assert not bad, (f"{rel} imports {bad}, which its row in docs/architecture.md does not "
                     f"allow ({patterns}); update the map or the import")


def test_engine_and_analysis_import_no_lightning() -> None:
    layer = [p for rel, p in package_modules().items()
             if rel.startswith("engine/") or rel in ("analysis.py", "dynamics.py", "report.py",
                                                     "insight.py", "theory.py")]
    for path in layer:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("lightning", "pytorch_lightning"), \
                    f"{path.relative_to(ROOT)} imports {name}"


def test_the_checker_sees_imports() -> None:
    """The parser above is not vacuous: known imports are found and judged."""
    api = internal_imports(PACKAGE / "engine" / "api.py")
    assert {"engine/modes", "engine/problem", "engine/structured"} <= api
    assert "engine/batch" in internal_imports(PACKAGE / "engine" / "generic.py")
    assert "engine/modes" in internal_imports(PACKAGE / "engine" / "structured" / "driver.py")
    assert "engine" in internal_imports(PACKAGE / "callback.py")
    assert allowed("engine/modes", ["engine/*"]) and not allowed("engine/structured/rules",
                                                                   ["engine/*"])
    assert not allowed("callback", ["analysis"])


# names in the walk-through that belong to torch, Lightning or TensorBoard, or are arguments
EXTERNAL = {"ValueError", "add_histogram", "add_image", "log_metrics", "pl_module.print",
            "trainer.callback_metrics", "pyplot", "every_n_epochs", "mypy",
            "init_kernel_at"}


def test_named_functions_exist() -> None:
    """Every function, class or module the walk-through and the recipes name in backticks
    is defined in the package (a rename must update the page)."""
    defined = {Path(rel).stem for rel in package_modules()} | {"engine", "structured"}
    for path in package_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    text = DOC.read_text()
    prose = text[text.index("## One report"):]
    missing = sorted(tok for tok in set(re.findall(r"`([A-Za-z_][\w.]*)`", prose))
                     if tok not in EXTERNAL and not tok.endswith((".py", ".toml", ".md"))
                     and tok.split(".")[-1] not in defined)
    assert not missing, f"docs/architecture.md names what the package does not define: {missing}"
