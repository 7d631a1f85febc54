"""Reuse of large output buffers (numbabn._buffers): a block comes back only when no
array, view, memoryview or tensor made from it is left; the pool's size limit and
switch. Threads and fork pools with every output pooled: tests/test_runtime.py."""

import gc

import numpy as np
import pytest

import numbabn
from numbabn import _buffers, config

MiB = 1 << 20
A = _buffers.ALIGN  # spare bytes of each block, for a view at a 64-byte boundary


@pytest.fixture
def pool(monkeypatch):
    """An empty pool that takes blocks of 1 MiB and up, at most 8 MiB."""
    monkeypatch.setattr(_buffers, "MIN_BYTES", MiB)
    monkeypatch.setattr(config, "BUFFER_CACHE_MB", 8)
    monkeypatch.setattr(_buffers, "_pool", [])
    return _buffers


def _addr(a):
    return a.__array_interface__["data"][0]


def test_a_dropped_buffer_is_handed_out_again(pool):
    y = pool.empty((256, 1024), np.dtype(np.float32))
    assert y.shape == (256, 1024) and y.dtype == np.float32 and y.flags.c_contiguous and y.flags.writeable
    first = _addr(y)
    assert first % 64 == 0
    del y
    z = pool.empty((1024, 256), np.dtype(np.float32))  # same byte size, another shape
    assert _addr(z) == first
    w = pool.empty((512, 512), np.dtype(np.float32))  # z is alive: a new block
    assert _addr(w) != first
    assert pool.pooled_bytes() == (2 * (MiB + A), 0)


@pytest.mark.parametrize(
    "keep",
    [
        lambda y: y,
        lambda y: y[::2],
        lambda y: y.reshape(-1),
        lambda y: y.base,
        lambda y: memoryview(y),
        lambda y: np.frombuffer(y, np.uint8),
        lambda y: [y.T],
    ],
    ids=["array", "strided view", "reshape", "base", "memoryview", "frombuffer", "in a list"],
)
def test_a_buffer_still_reachable_is_never_handed_out(pool, keep):
    y = pool.empty((256, 1024), np.dtype(np.float32))
    y[...] = 7.0
    kept = keep(y)
    first = _addr(y)
    del y
    z = pool.empty((256, 1024), np.dtype(np.float32))
    z[...] = -1.0
    assert _addr(z) != first
    del kept
    gc.collect()
    assert _addr(pool.empty((256, 1024), np.dtype(np.float32))) == first


def test_a_tensor_on_the_buffer_keeps_it(pool):
    torch = pytest.importorskip("torch")
    y = pool.empty((256, 1024), np.dtype(np.float32))
    t = torch.from_numpy(y)
    first = _addr(y)
    del y
    assert _addr(pool.empty((256, 1024), np.dtype(np.float32))) != first
    del t
    assert _addr(pool.empty((256, 1024), np.dtype(np.float32))) == first


def test_sizes_do_not_mix_and_small_requests_bypass(pool):
    y = pool.empty((MiB,), np.dtype(np.uint8))
    first = _addr(y)
    del y
    assert _addr(pool.empty((2 * MiB,), np.dtype(np.uint8))) != first  # another size: new block
    assert _addr(pool.empty((MiB // 8,), np.dtype(np.float64))) == first  # same bytes, other dtype
    pool.empty((MiB - 1,), np.dtype(np.uint8))  # below MIN_BYTES: plain np.empty
    assert pool.pooled_bytes()[0] == 3 * MiB + 2 * A


def test_pool_limit_and_switch(pool, monkeypatch):
    held = [pool.empty((MiB,), np.dtype(np.uint8)) for _ in range(12)]
    assert pool.pooled_bytes() == (7 * (MiB + A), 0)  # the oldest five forgotten
    assert pool.empty((9 * MiB,), np.dtype(np.uint8)).size == 9 * MiB  # above the limit: not pooled
    assert pool.pooled_bytes()[0] == 7 * (MiB + A)
    del held
    assert pool.pooled_bytes() == (7 * (MiB + A), 7 * (MiB + A))
    assert numbabn.empty_cache() == 7 * (MiB + A)
    assert pool.pooled_bytes() == (0, 0)
    monkeypatch.setattr(config, "BUFFER_CACHE_MB", 0)
    y = pool.empty((2 * MiB,), np.dtype(np.uint8))
    assert pool.pooled_bytes() == (0, 0) and y.flags.owndata


@pytest.mark.parametrize("short", [0, 1, A - 1, A])
def test_a_request_at_the_limit_is_served(pool, short):
    """The pool's limit counts the aligned block: a request within ALIGN bytes of the
    limit (an output of exactly the default 256 MiB, such as 64x64x128x128 float32)
    is plain np.empty, not a pool emptied to make room that cannot be made."""
    pool.empty((MiB,), np.dtype(np.uint8))
    y = pool.empty((8 * MiB - short,), np.dtype(np.uint8))
    assert y.size == 8 * MiB - short
    # A block of exactly the limit is pooled, in place of the older block.
    assert pool.pooled_bytes()[0] == (8 * MiB if short == A else MiB + A)


def test_empty_cache_keeps_blocks_in_use(pool):
    a = pool.empty((MiB,), np.dtype(np.uint8))
    b = pool.empty((MiB,), np.dtype(np.uint8))
    del b
    assert numbabn.empty_cache() == MiB + A
    assert pool.pooled_bytes() == (MiB + A, 0) and a.size == MiB


def test_forward_and_backward_outputs_through_the_pool(pool, rng):
    x = rng.standard_normal((64, 16, 512)).astype(np.float32)  # 2 MiB
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g, b = np.full(16, 1.5, np.float32), np.full(16, 0.5, np.float32)
    y1, ctx1 = numbabn.batch_norm_forward(x, g, b)
    e_y = y1.copy()
    dx1 = numbabn.batch_norm_backward(dy, ctx1)[0]
    e_dx = dx1.copy()
    assert not np.shares_memory(y1, dx1)
    first = {_addr(y1), _addr(dx1)}
    del y1, dx1
    y2, ctx2 = numbabn.batch_norm_forward(x, g, b)
    dx2 = numbabn.batch_norm_backward(dy, ctx2)[0]
    assert {_addr(y2), _addr(dx2)} == first  # both blocks came back
    np.testing.assert_array_equal(y2, e_y)
    np.testing.assert_array_equal(dx2, e_dx)
    y3, _ = numbabn.batch_norm_forward(x + 1, g, b)  # y2 and dx2 alive: a third block
    assert _addr(y3) not in first
    np.testing.assert_array_equal(y2, e_y)


def test_torch_module_outputs_alive_are_never_reused(pool):
    torch = pytest.importorskip("torch")
    import numbabn.torch as nbt

    torch.manual_seed(0)
    ours, native = nbt.BatchNorm2d(16, activation="relu"), torch.nn.BatchNorm2d(16)
    xs = [torch.randn(32, 16, 32, 32, requires_grad=True) for _ in range(3)]  # 2 MiB each
    outs = [ours(x) for x in xs]  # all alive: three blocks
    assert len({y.data_ptr() for y in outs}) == 3
    for x, y in zip(xs, outs, strict=True):
        torch.testing.assert_close(y, torch.relu(native(x)), rtol=1e-5, atol=1e-5)
    sum((y * (i + 1)).sum() for i, y in enumerate(outs)).backward()  # dx blocks while y alive
    for i, x in enumerate(xs):
        xr = x.detach().clone().requires_grad_(True)
        (torch.relu(native(xr)) * (i + 1)).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    del outs, y
    for x in xs:
        x.grad = None
    gc.collect()
    free = {b.ctypes.data for b in pool._pool}
    assert pool.pooled_bytes() == (3 * (2 * MiB + A),) * 2  # three blocks, none in use
    ptr = ours(xs[0]).data_ptr()
    assert any(0 <= ptr - base < A for base in free)
