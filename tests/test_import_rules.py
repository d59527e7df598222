"""The package keeps DESIGN.md's dependency direction (rules and layers in tests/import_rules.py), and the
tests keep their own house rules: no test imports conftest, no test skips for want of a package the test
extra installs."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import import_rules as R

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


@pytest.fixture(scope="module")
def found():
    return list(R.imports())


def _report(bad) -> str:
    return "\n".join(f"{title}:\n  " + "\n  ".join(imp.where() for imp in imps) for title, imps in bad.items())


def test_every_top_level_module_has_a_layer():
    assert R.unclassified() == [], "classify the new module in tests/import_rules.py LAYERS"


def test_the_package_keeps_the_dependency_direction(found):
    bad = R.violations(found)
    assert not bad, "\n" + _report(bad)


def test_every_exception_is_still_needed(found):
    assert R.stale_exceptions(found) == [], "drop the stale entries from tests/import_rules.py EXCEPTIONS"


def test_the_checker_sees_relative_lazy_and_from_package_imports(found):
    """The rules are only as good as the import list: it must see what the package really does."""
    targets = {(imp.importer, imp.target) for imp in found}
    assert ("mlxedge.cli.serve", "mlxedge.engine.Engine") in targets  # a lazy, relative import in a function
    assert ("mlxedge.cli.evaluation", "mlxedge.evaluate") in targets  # `from .. import evaluate`: the module
    assert ("mlxedge.sources.registry", "mlxedge.fsutil") in targets
    assert ("mlxedge.metal.dispatch", "mlx.core") in targets


# ------------------------------------------------------------------------------------------------ planted

PLANTED = {
    "cli/__init__.py": "from ..generate.loop import generate_stream\nfrom .. import bench\n",
    "cli/ok.py": "import mlxedge\nfrom mlxedge import Session\nfrom ..engine import Engine\n",
    "server/app.py": "def later():\n    from mlxedge.sources.registry import cache_dir\n",
    "bench.py": "from .evaluate import builtin_text\nfrom mlxedge import generate\n",
    "evaluate.py": "",
    "engine/__init__.py": "from ..generate import session\n",
    "model.py": "from .cli import main\n",
    "metal/__init__.py": "import numpy\nfrom ..errors import MlxedgeError\nimport mlx.core as mx\nimport os\n"
                        "from . import runner\n",
    "metal/runner.py": "",
    "cpu/__init__.py": "import scipy_openblas32\n",
    "sources/__init__.py": "from ..loading import load_checkpoint\nfrom mlx import nn\nimport mlx_lm.models\n"
                           "from .. import fsutil\nfrom ..errors import SourceError\nimport numpy\n",
    "generate/loop.py": "",
    "loading.py": "", "fsutil.py": "", "errors.py": "",
    "__init__.py": "",
}


@pytest.fixture
def planted(tmp_path):
    for name, text in PLANTED.items():
        path = tmp_path / "mlxedge" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(R.imports(tmp_path))


def test_each_rule_catches_a_planted_violation(planted):
    bad = {title: sorted(imp.where().split(" (", 1)[1] for imp in imps)
           for title, imps in R.violations(planted, exceptions={}).items()}
    rules = list(R.RULES)
    assert bad[rules[0]] == ["mlxedge.bench imports mlxedge.generate)", "mlxedge.cli imports mlxedge.generate.loop.generate_stream)",
                             "mlxedge.engine imports mlxedge.generate.session)",
                             "mlxedge.server.app imports mlxedge.sources.registry.cache_dir)"]
    assert bad[rules[1]] == ["mlxedge.bench imports mlxedge.evaluate.builtin_text)", "mlxedge.model imports mlxedge.cli.main)"]
    assert bad[rules[2]] == ["mlxedge.cpu imports scipy_openblas32)", "mlxedge.metal imports mlxedge.errors.MlxedgeError)",
                             "mlxedge.metal imports numpy)"]
    assert bad[rules[3]] == ["mlxedge.sources imports mlx.nn)", "mlxedge.sources imports mlx_lm.models)",
                             "mlxedge.sources imports mlxedge.loading.load_checkpoint)"]


def test_an_exception_excuses_exactly_its_import(planted):
    exceptions = {("mlxedge.server", "mlxedge.sources.registry.cache_dir"): "planted"}
    bad = R.violations(planted, exceptions=exceptions)[list(R.RULES)[0]]
    assert "mlxedge.sources.registry.cache_dir" not in {imp.target for imp in bad} and len(bad) == 3
    stale = {("mlxedge.cli", "mlxedge.sources.registry.cache_dir"): "not imported there"}
    assert R.stale_exceptions(planted, stale) == list(stale)


def test_a_new_top_level_module_must_be_classified(tmp_path):
    (tmp_path / "mlxedge").mkdir()
    (tmp_path / "mlxedge" / "__init__.py").write_text("")
    (tmp_path / "mlxedge" / "newcomer.py").write_text("")
    assert R.unclassified(tmp_path) == ["newcomer"]


# ------------------------------------------------------------------------------------------------ the tests

def _test_files():
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_test_imports_conftest_as_a_module():
    """pytest loads conftest.py as a plugin; importing it again by name runs it twice as two modules."""
    offenders = []
    for path in [*_test_files(), *sorted((ROOT / "scripts").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "conftest"]
    assert offenders == [], "import shared helpers from a module such as tests/fixture_cache.py"


def _normalised(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]).lower()


def installed_by_the_test_extra() -> set:
    """Distributions `pip install -e '.[test]'` installs by name: the runtime dependencies and the test extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalised(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]}


def _distributions(module: str) -> set:
    top = module.split(".")[0]
    return {_normalised(d) for d in metadata.packages_distributions().get(top, [])} | {_normalised(top)}


def test_no_test_skips_for_a_package_the_test_extra_installs():
    """A missing test dependency must fail the run, not skip the tests that need it."""
    required = installed_by_the_test_extra()
    offenders = []
    for path in _test_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "importorskip" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                module = node.args[0].value
                if _distributions(module) & required:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} importorskip({module!r})")
    assert offenders == [], "import these directly (the test extra installs them)"
    assert {"torch", "pexpect", "openai", "jsonschema", "mlx"} <= required  # the extra is read, not empty
