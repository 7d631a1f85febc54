"""pytest-benchmark suite settings: which harness suite (numbabn.bench.cases.SUITES) and dtype.

    pytest bench/ --benchmark-only                                  # default suite, float32
    pytest bench/ --benchmark-only --bench-suite resnet --bench-dtype float64
    pytest bench/ --benchmark-only --benchmark-group-by=group,param:case   # numbabn vs torch per case

``case`` is parametrized per module scope so that pytest runs all tests of one case
together and each case's arrays are built once (the large ones are ~50 MB).
"""

import numpy as np
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("numbabn bench")
    group.addoption(
        "--bench-suite", default="default", help="numbabn.bench.cases.SUITES name, or 'all' (default: default)"
    )
    group.addoption(
        "--bench-dtype", default="float32", choices=("float32", "float64"), help="input dtype (default: float32)"
    )


def pytest_configure(config):
    from numbabn.bench.cases import SUITES

    name = config.getoption("--bench-suite")
    if name not in (*SUITES, "all"):
        raise pytest.UsageError(f"--bench-suite {name!r}: choose from {', '.join([*SUITES, 'all'])}")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from numbabn.bench.cases import SUITES

    name = metafunc.config.getoption("--bench-suite")
    suites = SUITES if name == "all" else (name,)
    cases = list(dict.fromkeys(case for suite in suites for case in SUITES[suite]))
    metafunc.parametrize("case", cases, ids=[case.name for case in cases], scope="module")


@pytest.fixture(scope="session")
def dtype(pytestconfig):
    return np.dtype(pytestconfig.getoption("--bench-dtype"))
