"""16-bit data in the CPU kernels (numbabn.kernels.storage): float16 and bfloat16 read
as their bit patterns and converted exactly to float32, results rounded to nearest
even, and batch norm on 16-bit input equal, bit for bit, to batch norm on the same
values in float32 followed by rounding -- with no float32 copy of the input.
"""

import numpy as np
import pytest
from numba import njit

import numbabn
from numbabn._layout import BFLOAT16
from numbabn.kernels import storage


@njit
def _decode(bits, out):
    for i in range(bits.size):
        out[i] = storage.decode(bits[i])


@njit
def _encode(values, out):
    for i in range(values.size):
        out[i] = storage.encode(values[i], out)


ALL_BITS = np.arange(1 << 16, dtype=np.uint16)


def decode(bits):
    out = np.empty(bits.size, np.float32)
    _decode(bits, out)
    return out


def encode(values, dtype):
    out = np.empty(values.size, dtype)
    _encode(values.astype(np.float32), out)
    return out


def same_floats(a, b):
    """Equal bit patterns, except that any NaN equals any NaN."""
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


def bfloat16_nearest(values):
    """The bfloat16 pattern nearest each finite float32 (ties to the even pattern),
    found by comparing the two candidates in float64: independent of the bit trick."""
    bits = values.view(np.uint32).astype(np.int64)
    down = bits & 0xFFFF0000
    up = down + 0x10000

    def as_float(b):
        # Past the largest finite bfloat16 the "up" pattern is infinity's; IEEE rounding
        # measures the distance to 2**128 there (as if the exponent went on).
        f = (b & 0xFFFFFFFF).astype(np.uint32).view(np.float32).astype(np.float64)
        return np.where(np.isinf(f), np.copysign(2.0**128, f), f)

    v = values.astype(np.float64)
    d_down, d_up = np.abs(v - as_float(down)), np.abs(as_float(up) - v)
    pick_up = (d_up < d_down) | ((d_up == d_down) & (((down >> 16) & 1) == 1))
    return (np.where(pick_up, up, down) >> 16).astype(np.uint16)


def float16_cases(rng):
    """float32 values around every float16: each finite float16, the exact midpoints
    between neighbours (ties) and the float32 values next to them, overflow edges,
    random values over the whole exponent range, infinities, NaN, signed zeros."""
    h = ALL_BITS.view(np.float16)
    finite = np.sort(h[np.isfinite(h)].astype(np.float64))
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact: 12 significant bits
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    edges = np.array([65504, 65519.996, 65520, 65536, 1e9, 2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-26], np.float32)
    random = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-10, 6, 100_000)).astype(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    return np.concatenate([finite.astype(np.float32), around, edges, -edges, random, special])


def test_every_float16_pattern_decodes_as_numpy_does():
    assert same_floats(decode(ALL_BITS.view(np.int16)), ALL_BITS.view(np.float16).astype(np.float32))


def test_every_bfloat16_pattern_decodes_to_the_float32_with_those_upper_bits():
    expected = (ALL_BITS.astype(np.uint32) << 16).view(np.float32)
    assert same_floats(decode(ALL_BITS), expected)


def test_float16_rounding_matches_numpy_everywhere(rng):
    values = float16_cases(rng)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    got = encode(values, np.int16).view(np.float16)
    assert same_floats(got.astype(np.float32), expected.astype(np.float32))
    assert np.array_equal(got.view(np.int16)[~np.isnan(values)], expected.view(np.int16)[~np.isnan(values)])


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan(rng):
    bf = ALL_BITS[np.isfinite((ALL_BITS.astype(np.uint32) << 16).view(np.float32))]
    lo = (bf.astype(np.uint32) << 16).view(np.float32)
    ties = ((bf.astype(np.uint32) << 16) | 0x8000).view(np.float32)  # exactly halfway up from each
    near = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    random = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-40, 37, 100_000)).astype(np.float32)
    values = np.concatenate([lo, near[np.isfinite(near)], random, np.float32([3.4e38, -3.4e38, 0.0, -0.0])])
    assert np.array_equal(encode(values, np.uint16), bfloat16_nearest(values))
    special = encode(np.float32([np.inf, -np.inf, np.nan, -np.nan]), np.uint16)
    assert list(special[:2]) == [0x7F80, 0xFF80]
    back = decode(special[2:])
    assert np.isnan(back).all()
    # Every NaN payload stays a NaN (truncating 0x7F800001 would give infinity).
    payloads = np.array([0x7F800001, 0x7FBFFFFF, 0xFF800001, 0x7FC00000], np.uint32).view(np.float32)
    assert np.isnan(decode(encode(payloads, np.uint16))).all()


def test_bfloat16_rounding_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    values = np.concatenate(
        [float16_cases(rng), (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-40, 37, 100_000)).astype(np.float32)]
    )
    ours = encode(values, np.uint16)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    keep = ~np.isnan(values)
    assert np.array_equal(ours[keep], theirs[keep])


CASES = [  # (shape, channel axis): both layouts, several block geometries
    ((8, 5, 33), 1),
    ((3, 4, 5000), 1),
    ((64, 7), 1),
    ((6, 9, 4, 3), -1),
]


def _as_bfloat16(a32):
    """float32 values rounded to bfloat16, as (BFLOAT16 array, float32 values)."""
    bits = encode(a32.ravel(), np.uint16).reshape(a32.shape)
    return bits.view(BFLOAT16), (bits.astype(np.uint32) << 16).view(np.float32)


def _rounded(a32, fmt):
    return a32.astype(np.float16) if fmt == "float16" else encode(a32.ravel(), np.uint16).reshape(a32.shape)


def _bits(a, fmt):
    return a.view(np.int16 if fmt == "float16" else np.uint16)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_16_bit_batch_norm_is_float32_batch_norm_rounded(rng, fmt, shape, axis, relu, residual):
    """Forward (training, then eval), backward, with and without a fused residual:
    the 16-bit result is exactly the float32 computation on the same values,
    rounded; the per-channel results are the float32 ones themselves, and the input
    is read where it lies (no copy)."""
    C = shape[axis]

    def pair(a32):
        if fmt == "float16":
            return a32.astype(np.float16), a32.astype(np.float16).astype(np.float32)
        return _as_bfloat16(a32)

    x16, x32 = pair((rng.standard_normal(shape) * 3 + 5).astype(np.float32))
    dy16, dy32 = pair(rng.standard_normal(shape).astype(np.float32))
    r16, r32 = pair(rng.standard_normal(shape).astype(np.float32)) if residual else (None, None)
    g, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    state16 = [np.zeros(C, np.float32), np.ones(C, np.float32)]
    state32 = [s.copy() for s in state16]
    act = "relu" if relu else None
    y16, ctx16 = numbabn.batch_norm_forward(
        x16, g, b, running_mean=state16[0], running_var=state16[1], axis=axis, activation=act, residual=r16
    )
    y32, ctx32 = numbabn.batch_norm_forward(
        x32, g, b, running_mean=state32[0], running_var=state32[1], axis=axis, activation=act, residual=r32
    )
    assert y16.dtype == x16.dtype and np.shares_memory(ctx16.x, x16)
    assert np.array_equal(_bits(y16, fmt), _bits(_rounded(y32, fmt), fmt))
    for s16, s32 in zip(state16, state32, strict=True):
        assert np.array_equal(s16, s32)
    dx16, dg16, db16, *dr16 = numbabn.batch_norm_backward(dy16, ctx16)
    dx32, dg32, db32, *dr32 = numbabn.batch_norm_backward(dy32, ctx32)
    assert dx16.dtype == x16.dtype and dg16.dtype == np.float32
    assert np.array_equal(_bits(dx16, fmt), _bits(_rounded(dx32, fmt), fmt))
    assert np.array_equal(dg16, dg32) and np.array_equal(db16, db32)
    for a, e in zip(dr16, dr32, strict=True):  # the residual's gradient
        assert a.dtype == x16.dtype and np.array_equal(_bits(a, fmt), _bits(_rounded(e, fmt), fmt))
    out = np.empty_like(x16)
    ye, _ = numbabn.batch_norm_forward(
        x16, g, b, running_mean=state16[0], running_var=state16[1], training=False, axis=axis, out=out
    )
    ye32, _ = numbabn.batch_norm_forward(
        x32, g, b, running_mean=state32[0], running_var=state32[1], training=False, axis=axis
    )
    assert ye is out and np.array_equal(_bits(out, fmt), _bits(_rounded(ye32, fmt), fmt))


def test_strided_float16_is_copied_as_float16(rng):
    x = rng.standard_normal((6, 4, 10)).astype(np.float16)[:, :, ::2]
    y, ctx = numbabn.batch_norm_forward(x)
    assert ctx.x.dtype.itemsize == 2 and y.dtype == np.float16
    ref, _ = numbabn.batch_norm_forward(x.astype(np.float32))
    assert np.array_equal(y, ref.astype(np.float16))


def test_moments_of_float16_are_those_of_its_float32_values(rng):
    x = (rng.standard_normal((7, 3, 9)) * 100 + 1e3).astype(np.float16)
    a, b = numbabn.moments(x), numbabn.moments(x.astype(np.float32))
    assert a.count == b.count and np.array_equal(a.mean, b.mean) and np.array_equal(a.m2, b.m2)
