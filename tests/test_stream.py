"""Non-temporal stores (numbabn.kernels.stream): a streamed write equals an ordinary
copy at every alignment and length, and every element-wise kernel writes the same
bytes streamed or not: both layouts, four dtypes, ReLU, a fused residual, training
and eval forward, backward, many blocks on two threads, misaligned ``out=``."""

import numpy as np
import pytest
from numba import njit

import numbabn
from numbabn import config
from numbabn.kernels.stream import fence, flush, reserve, write

from .test_storage import _as_bfloat16


@njit
def _copy(src, dst):
    write(dst, src)
    fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16])
def test_write_equals_a_copy_at_every_alignment_and_length(dtype):
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257):
        src = (np.arange(n) % 251 + 1).astype(dtype)
        for off in range(9):  # start offsets in elements: every 32-byte phase
            buf = np.zeros(n + 24, dtype)
            dst = buf[off : off + n]
            _copy(src, dst)
            assert np.array_equal(dst, src), (n, off)
            assert not buf[:off].any() and not buf[off + n :].any(), (n, off)


@njit
def _buffered(src, out, starts, m, capacity):
    """Rows ``src[i:i+m]`` for i in ``starts`` into ``out`` through a buffer of
    ``capacity`` elements, as the kernels do."""
    tmp = np.empty(capacity, out.dtype)
    p = base = 0
    for i in starts:
        p, base = reserve(out, tmp, p, base, i, m)
        tmp[p : p + m] = src[i : i + m]
        p += m
    flush(out, tmp, p, base)


@pytest.mark.parametrize("capacity", [10, 64, 1000])
def test_buffered_rows_land_where_they_belong(capacity):
    src = np.arange(1, 401, dtype=np.float32)
    starts = np.array([0, 10, 20, 50, 60, 200, 210, 100, 390, 380, 30])  # runs, jumps, backwards
    out = np.zeros_like(src)
    _buffered(src, out, starts, 10, capacity)
    expected = np.zeros_like(src)
    for i in starts:
        expected[i : i + 10] = src[i : i + 10]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_write_to_an_unaligned_array_uses_ordinary_stores(dtype):
    src = np.arange(1, 301).astype(dtype)
    buf = bytearray(src.nbytes + 1)
    dst = np.frombuffer(buf, dtype, count=src.size, offset=1)  # address not a multiple of itemsize
    assert not dst.flags.aligned
    _copy(src, dst)  # a streamed store there would fault
    np.testing.assert_array_equal(dst, src)


def test_unaligned_out_is_written_correctly_when_streaming(monkeypatch, rng):
    monkeypatch.setattr(config, "STREAM_AUTO", False)
    monkeypatch.setattr(config, "STREAM_MIN", 0)
    x = rng.standard_normal((4, 3, 500)).astype(np.float32)
    out = np.frombuffer(bytearray(x.nbytes + 1), np.float32, count=x.size, offset=1).reshape(x.shape)
    y, _ = numbabn.batch_norm_forward(x, out=out)
    monkeypatch.setattr(config, "STREAM_MIN", 1 << 62)
    np.testing.assert_array_equal(y, numbabn.batch_norm_forward(x)[0])


def _data(rng, dtype, shape):
    a = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    if dtype == "bfloat16":
        return _as_bfloat16(a)[0]
    return a.astype(dtype)


def _misaligned(like):
    """An out= array like ``like`` that starts one element past an allocation."""
    return np.empty(like.size + 1, like.dtype)[1:].reshape(like.shape)


def _run(rng, shape, axis, dtype, relu, residual):
    """Everything the kernels write for one input, as bytes."""
    C = shape[axis]
    x, dy = _data(rng, dtype, shape), _data(rng, dtype, shape)
    r = _data(rng, dtype, shape) if residual else None
    pdt = np.float64 if dtype == np.float64 else np.float32
    g, b = rng.uniform(0.5, 1.5, C).astype(pdt), rng.standard_normal(C).astype(pdt)
    rm, rv = np.zeros(C, pdt), np.ones(C, pdt)
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(
        x, g, b, running_mean=rm, running_var=rv, axis=axis, activation=act, residual=r, out=_misaligned(x)
    )
    grads = numbabn.batch_norm_backward(dy, ctx, out=_misaligned(x))
    ye, _ = numbabn.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv, training=False, axis=axis)
    return [np.ascontiguousarray(a).view(np.uint8) for a in (y, *grads, ye, rm, rv) if a is not None]


CASES = [
    ((6, 5, 300), 1),  # rows a little longer than the chunk: two pieces per row
    ((3, 4, 1000), 1),  # rows longer than the chunk: pieces, one row per block
    ((3, 5, 90), 1),  # blocks of 3 channels, 270 values: more than the chunk (256)
    ((40, 3, 20), 1),  # blocks of 4 whole samples: several blocks per buffer flush
    ((5, 7, 3, 11), -1),  # channels last, C = 11: runs of 23 rows
    ((300, 70), -1),
    ((9, 300), -1),  # C longer than the chunk
]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16"])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("chunk", [256, 1024])  # 1024: channels-last groups of several runs
def test_streamed_outputs_are_the_ordinary_ones(monkeypatch, shape, axis, dtype, relu, residual, chunk):
    monkeypatch.setattr(config, "CHUNK", chunk)  # many blocks ...
    monkeypatch.setattr(config, "SERIAL_MAX", 0)  # ... shared by two threads
    monkeypatch.setattr(config, "STREAM_AUTO", False)  # STREAM_MIN decides
    got = {}
    with numbabn.limit_threads(2):
        for stream_min in (1 << 62, 0):
            monkeypatch.setattr(config, "STREAM_MIN", stream_min)
            got[stream_min] = _run(np.random.default_rng(7), shape, axis, dtype, relu, residual)
    for plain, streamed in zip(got[1 << 62], got[0], strict=True):
        np.testing.assert_array_equal(plain, streamed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, True)])
def test_rows_longer_than_the_buffer_stream_like_ordinary_ones(monkeypatch, dtype, relu, residual):
    # The default chunk: 5000-value rows are longer than the streaming buffer
    # (stream.WINDOW_BYTES: 1024 float32 values), so each is split where it fills.
    monkeypatch.setattr(config, "SERIAL_MAX", 0)
    monkeypatch.setattr(config, "STREAM_AUTO", False)
    got = {}
    with numbabn.limit_threads(2):
        for stream_min in (1 << 62, 0):
            monkeypatch.setattr(config, "STREAM_MIN", stream_min)
            got[stream_min] = _run(np.random.default_rng(3), (4, 3, 5000), 1, dtype, relu, residual)
    for plain, streamed in zip(got[1 << 62], got[0], strict=True):
        np.testing.assert_array_equal(plain, streamed)
