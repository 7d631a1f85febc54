"""Training-script audit of numbabn.torch against torch.nn's batch norm: scenarios
where the two differed (each test failed before its fix)."""

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
from torch.func import functional_call  # noqa: E402

import numbabn.torch as nt  # noqa: E402


def test_refused_running_buffer_changes_nothing():
    """A running_mean whose channels share one memory location (an expanded tensor,
    replaced through functional_call) cannot take the update: the call raises before
    the kernels run, so running_var and the batch count are not changed either
    (numbabn's kernels updated running_var in place, then failed writing running_mean
    back)."""
    torch.manual_seed(0)
    bn = nt.BatchNorm2d(8)
    x = torch.randn(8, 8, 4, 4)
    var = torch.ones(8)
    nbt = torch.tensor(0)
    buffers = {"running_mean": torch.zeros(1).expand(8), "running_var": var, "num_batches_tracked": nbt}
    with pytest.raises(RuntimeError, match="memory location"):
        functional_call(bn, buffers, (x,))
    assert torch.equal(var, torch.ones(8))
    assert int(nbt) == 0
    assert torch.equal(buffers["running_mean"], torch.zeros(8))
