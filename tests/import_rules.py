"""The dependency direction of DESIGN.md as data, and a checker that reads it from source with `ast`.

    front-ends (cli, server, bridge, bench, evaluate) → engine → public API → generate / loading →
    sources, quant, memory → kernel choice → metal, cpu

Every top-level module of mlxedge is put in one LAYER below, so a new module forces a decision (the test
fails until it is classified). The rules (each a function returning violations, so tests/test_import_rules.py
can also run them on a planted package and show that each one bites):

- front_end_internals: front-ends and the engine reach generation and weights through the public API
  (`mlxedge`, `mlxedge.api`, `mlxedge.model`) and the engine, never `mlxedge.generate.*` or
  `mlxedge.sources.*`.
- front_end_importers: nothing imports a front-end, except the front-end's own package and the CLI, which is
  the command-line door to the others (`mlxedge serve`, `mlxedge bridge`, `mlxedge bench`, `mlxedge eval`).
- kernel_imports: metal/ and cpu/ import only MLX, the standard library and their own package.
- source_imports: sources/ never imports model code (mlx-lm, mlx.nn, torch, or any mlxedge module of the
  model side), nor the engine or a front-end.

Imports are read statically, wherever they are in a file (lazy imports inside functions included); no module
is executed. `from pkg import name` counts as importing `pkg.name` when that is a module of the package.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

PACKAGE = "mlxedge"
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"

FRONT_END = "front-end"
ENGINE = "engine"
PUBLIC_API = "public API"
MODEL = "model"  # generation, loading, quantization, kernels: what sources/ must not see
SOURCES = "sources"
KERNELS = "kernels"  # metal/ and cpu/: MLX and the standard library only
SHARED = "shared"  # leaf helpers every layer may use

LAYERS: Dict[str, str] = {
    "cli": FRONT_END, "server": FRONT_END, "bridge": FRONT_END, "bench": FRONT_END, "evaluate": FRONT_END,
    "engine": ENGINE,
    "": PUBLIC_API, "api": PUBLIC_API, "model": PUBLIC_API,
    "generate": MODEL, "loading": MODEL, "quant": MODEL, "memory": MODEL, "kernels": MODEL, "adapters": MODEL,
    "architectures": MODEL, "architecture_fixes": MODEL, "configs": MODEL, "convert": MODEL, "export": MODEL,
    "recipe_search": MODEL, "tokenizer": MODEL, "fast_layers": MODEL,
    "sources": SOURCES,
    "metal": KERNELS, "cpu": KERNELS,
    "errors": SHARED, "fsutil": SHARED, "table": SHARED, "corpus": SHARED, "arguments": SHARED, "paths": SHARED,
}

INTERNALS = ("generate", "sources")  # packages front-ends and the engine reach only through the public API
CLI = "cli"
MODEL_CODE_OUTSIDE = ("mlx_lm", "mlx.nn", "torch")  # model code that is not ours

# (importer prefix, imported module or module.name) -> why it is right. Each entry must still match an import
# (a stale one fails), so the list only ever holds exceptions that exist.
EXCEPTIONS: Dict[Tuple[str, str], str] = {
    ("mlxedge.cpu", "scipy_openblas32"):
        "the native kernels' GEMM tiles call OpenBLAS; cpu/ finds the library shipped by scipy-openblas32 "
        "(a runtime dependency) to load it by path",
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    module: str  # the module imported (for `from mod import name`: mod, or mod.name when that is a module)
    name: Optional[str]  # the name taken from `module` when it is not itself a module
    line: int
    path: Path

    @property
    def target(self) -> str:
        return self.module if self.name is None else f"{self.module}.{self.name}"

    def where(self) -> str:
        return f"{self.path.name}:{self.line} ({self.importer} imports {self.target})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = SOURCE_ROOT, package: str = PACKAGE) -> Dict[str, Path]:
    """Dotted name -> file, for every module of `package` under `root`."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def imports(root: Path = SOURCE_ROOT, package: str = PACKAGE) -> Iterator[Import]:
    """Every import statement in the package, resolved to absolute dotted names."""
    known = modules(root, package)
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(name, alias.name, None, node.lineno, path)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:  # `from pkg import sub` imports the module pkg.sub
                        yield Import(name, sub, None, node.lineno, path)
                    else:
                        yield Import(name, base, alias.name, node.lineno, path)


def _resolve_from(importer: str, is_package: bool, level: int, module: Optional[str]) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]  # a module's relative imports start from its package
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _is_ours(name: str, package: str = PACKAGE) -> bool:
    return name == package or name.startswith(package + ".")


def component(name: str, package: str = PACKAGE) -> Optional[str]:
    """The top-level part of an mlxedge module ("" for the package itself); None for outside modules."""
    if not _is_ours(name, package):
        return None
    rest = name[len(package) + 1:]
    return rest.split(".")[0] if rest else ""


def imported_component(imp: Import, package: str = PACKAGE, layers=LAYERS) -> Optional[str]:
    """The top-level part `imp` reaches: `from mlxedge import generate` reaches "generate" (a namespace
    package), `from mlxedge import load` the package itself ("")."""
    if imp.module == package and imp.name in layers:
        return imp.name
    return component(imp.module, package)


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def excepted(imp: Import, exceptions=EXCEPTIONS) -> bool:
    return any(under(imp.importer, who) and imp.target == what for who, what in exceptions)


# ------------------------------------------------------------------------------------------------ rules

def unclassified(root: Path = SOURCE_ROOT, package: str = PACKAGE, layers=LAYERS) -> List[str]:
    return sorted({component(m, package) for m in modules(root, package)} - set(layers))


def front_end_internals(found: List[Import], package: str = PACKAGE, layers=LAYERS) -> List[Import]:
    out = []
    for imp in found:
        if layers.get(component(imp.importer, package)) not in (FRONT_END, ENGINE):
            continue
        if any(under(imp.target, f"{package}.{internal}") for internal in INTERNALS):
            out.append(imp)
    return out


def front_end_importers(found: List[Import], package: str = PACKAGE, layers=LAYERS) -> List[Import]:
    out = []
    for imp in found:
        target, importer = imported_component(imp, package, layers), component(imp.importer, package)
        if layers.get(target) != FRONT_END or target == importer or importer == CLI:
            continue
        out.append(imp)
    return out


def kernel_imports(found: List[Import], package: str = PACKAGE, layers=LAYERS) -> List[Import]:
    out = []
    for imp in found:
        own = component(imp.importer, package)
        if layers.get(own) != KERNELS:
            continue
        root = imp.module.split(".")[0]
        if under(imp.module, f"{package}.{own}") or root == "mlx" or root in sys.stdlib_module_names:
            continue
        out.append(imp)
    return out


def source_imports(found: List[Import], package: str = PACKAGE, layers=LAYERS) -> List[Import]:
    out = []
    for imp in found:
        if layers.get(component(imp.importer, package)) != SOURCES:
            continue
        layer = layers.get(imported_component(imp, package, layers))
        if layer in (MODEL, KERNELS, PUBLIC_API, ENGINE, FRONT_END) or any(
                under(imp.target, outside) for outside in MODEL_CODE_OUTSIDE):
            out.append(imp)
    return out


RULES = {"front-ends and the engine use the public API, not generate/ or sources/": front_end_internals,
         "nothing imports a front-end (but the CLI and the front-end itself)": front_end_importers,
         "metal/ and cpu/ import only mlx and the standard library": kernel_imports,
         "sources/ never imports model code": source_imports}


def violations(found: List[Import], exceptions=EXCEPTIONS, package: str = PACKAGE,
               layers=LAYERS) -> Dict[str, List[Import]]:
    """Per rule, the imports that break it and are not listed in `exceptions`."""
    out = {}
    for title, rule in RULES.items():
        bad = [imp for imp in rule(found, package, layers) if not excepted(imp, exceptions)]
        if bad:
            out[title] = bad
    return out


def stale_exceptions(found: List[Import], exceptions=EXCEPTIONS) -> List[Tuple[str, str]]:
    """Exceptions that no import needs any more."""
    return [key for key in exceptions
            if not any(under(imp.importer, key[0]) and imp.target == key[1] for imp in found)]
