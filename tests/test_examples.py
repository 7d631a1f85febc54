"""Every script in examples/ runs, with tiny settings, the way its docstring launches it.

The MPI example under ``mpiexec -n 2`` (the mpich wheel's, as in test_distributed_mpi.py)
with ``--check``: two ranks reproduce the single-process run. The PyTorch example under
``torch.distributed.run`` (torchrun) with 2 gloo processes: the ranks' running
statistics agree. Each skips only when its extra is not installed.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 120


def _run(cmd):
    """Run ``cmd`` from the repository root with one Numba and one OpenMP thread per
    process (the processes share this machine's cores); coreutils' ``timeout`` ends the whole job
    if a process is left waiting in a collective. Returns stdout+stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "MPIR_"))}
    env["NUMBA_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    guard = [shutil.which("timeout"), "-k", "10", str(TIMEOUT)] if shutil.which("timeout") else []
    proc = subprocess.run([*guard, *cmd], capture_output=True, text=True, timeout=TIMEOUT + 30, env=env, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-4000:]}"
    return output


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["data_parallel_mpi.py", "torch_ddp_syncbn.py"]


@pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or _mpiexec() is None,
    reason="needs mpi4py and mpiexec (pip install -e '.[mpi]')",
)
def test_data_parallel_mpi_matches_the_single_process_run():
    output = _run(
        [
            _mpiexec(),
            "-n",
            "2",
            sys.executable,
            str(EXAMPLES / "data_parallel_mpi.py"),
            "--check",
            "--steps",
            "21",
            "--every",
            "10",
        ]
    )
    assert "parameters bit-identical on all 2 rank(s): yes" in output, output
    # steps 0, 10 and 20, the last one once (it is also a multiple of --every)
    assert [line.split()[1] for line in output.splitlines() if line.startswith("step ")] == ["0", "10", "20"], output
    check = [line for line in output.splitlines() if line.startswith("check: max abs difference of the loss")]
    assert float(check[0].split(": ")[-1].split()[0]) <= 1e-9, output


def test_torch_ddp_syncbn_ranks_agree():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e '.[torch]')")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this PyTorch has no gloo backend")
    output = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "torch_ddp_syncbn.py"),
            "--steps",
            "2",
            "--batch",
            "8",
        ]
    )
    assert "step 1: loss on rank 0's slice" in output, output
    for rank in (0, 1):
        assert f"rank {rank}: running statistics identical to rank 0's" in output, output
