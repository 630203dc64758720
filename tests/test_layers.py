"""The package's shape, held in place: the import contract (pyproject.toml's
[tool.importlinter]: layers, search without training, no cycles), a light
``import fnemm``, and modules and functions small enough to read in one sitting."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def test_the_import_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports not found: pip install -e '.[dev]' (import-linter)")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "3 kept, 0 broken" in done.stdout


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code`` (listed on
    stderr: ``code`` may print to stdout)."""
    err = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('MODULES', *sys.modules, file=sys.stderr)"],
                         capture_output=True, text=True, check=True).stderr
    return set(err.split("MODULES", 1)[1].split())


@pytest.mark.parametrize("code", [
    "import fnemm",
    "import fnemm.errors",
    "from fnemm import FnemmError",
    "import fnemm.datasets",
    # the CLI's --help builds every parser: none of them may need torch
    "from fnemm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from fnemm.cli import main\ntry:\n    main(['extract', '--help'])\nexcept SystemExit:\n    pass",
])
def test_light_imports_load_neither_torch_nor_nltk(code):
    loaded = _modules_after(code)
    assert "torch" not in loaded and "nltk" not in loaded, code


def test_public_names_load_on_first_use():
    loaded = _modules_after("import fnemm\nfnemm.load_dataset\nfnemm.FnemmError")
    assert "fnemm.datasets" in loaded and "torch" not in loaded
    code = "import fnemm\nassert callable(fnemm.train) and callable(fnemm.extract) and fnemm.Gallery\n" \
           "import fnemm.training.trainer\nassert callable(fnemm.train)\nprint(fnemm.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import fnemm
        fnemm.nope  # noqa: B018


def _python_files():
    return sorted(p for p in SRC.rglob("*.py"))


def test_no_module_over_400_lines_and_no_function_over_80():
    long_modules = [f"{p.relative_to(SRC)}: {n}" for p in _python_files()
                    if (n := len(p.read_text().splitlines())) > 400]
    long_functions = []
    for p in _python_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name}: {length}")
    assert not long_modules and not long_functions, long_modules + long_functions
