"""BatchNormTransformer and numbabn.distributed.dask on Dask arrays vs NumPy.

Runs with Dask's local schedulers only (synchronous and threads): statistics equal
the NumPy ones to float64 rounding, transform is lazy (nothing computed until asked,
and then equal to the NumPy transform bit for bit), errors match the NumPy path.
"""

import subprocess
import sys

import numpy as np
import pytest

import numbabn
from numbabn.sklearn import BatchNormTransformer

dask = pytest.importorskip("dask", reason="dask is not installed (pip install -e '.[dask]')")
da = pytest.importorskip("dask.array")

from numbabn.distributed import dask as nd  # noqa: E402

SCHEDULERS = ["synchronous", "threads"]


@pytest.fixture(params=SCHEDULERS)
def scheduler(request):
    with dask.config.set(scheduler=request.param):
        yield request.param


def data(rng, n=1000, p=7, dtype=np.float64):
    """Hard statistics: |mean| >> std, so E[x^2]-E[x]^2 would be useless."""
    return (rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p) + 1e5).astype(dtype)


class Counter:
    """Counts the chunk tasks Dask runs (a scheduler callback)."""

    def __init__(self):
        self.tasks = 0

    def __enter__(self):
        from dask.callbacks import Callback

        self.cb = Callback(pretask=lambda key, dsk, state: setattr(self, "tasks", self.tasks + 1))
        self.cb.__enter__()
        return self

    def __exit__(self, *exc):
        self.cb.__exit__(*exc)


@pytest.mark.parametrize("chunks", [(1000, 7), (130, 7), (97, 3), (7, 1)])
def test_moments_equal_numpy(rng, scheduler, chunks):
    x = data(rng)
    m = nd.moments(da.from_array(x, chunks=chunks))
    ref = numbabn.moments(x)
    assert m.count == ref.count == 1000
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-15, atol=0)
    np.testing.assert_allclose(m.m2, ref.m2, rtol=1e-11)


@pytest.mark.parametrize(
    "shape, axis, chunks",
    [((6, 3, 5, 4), 1, (2, 2, 3, 2)), ((6, 5, 4, 3), -1, (4, 5, 3, 1)), ((9, 2), 0, (4, 1)), ((5, 3), 1, (1, 3))],
)
def test_moments_any_axis(rng, shape, axis, chunks):
    x = rng.standard_normal(shape) + 3
    m = nd.moments(da.from_array(x, chunks=chunks), axis=axis)
    ref = numbabn.moments(x, axis=axis)
    assert m.count == ref.count
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-14)
    np.testing.assert_allclose(m.m2, ref.m2, rtol=1e-12)


def test_moments_tree_is_deterministic_and_one_task_per_chunk(rng):
    x = data(rng, n=1200, p=4)
    X = da.from_array(x, chunks=(100, 2))  # 12 x 2 chunks
    graph = nd.moments_graph(X)
    tasks = dict(graph.__dask_graph__())
    chunk_tasks = [k for k in tasks if str(k).startswith("_block_moments")]
    merges = [k for k in tasks if str(k).startswith("merge_moments")]
    assert len(chunk_tasks) == 24 and len(merges) == 2 * 11  # a binary tree per channel group
    with dask.config.set(scheduler="threads"):
        a = graph.compute()
    with dask.config.set(scheduler="synchronous"):
        b = graph.compute()
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.m2, b.m2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_fit_transform_equal_numpy(rng, scheduler, dtype, momentum):
    x = data(rng, dtype=dtype)
    X = da.from_array(x, chunks=(150, 4))
    ref = BatchNormTransformer(momentum=momentum, gamma=rng.uniform(0.5, 2, 7), beta=1.5).fit(x)
    est = BatchNormTransformer(momentum=momentum, gamma=ref.gamma, beta=1.5).fit(X)
    assert est.n_samples_seen_ == 1000 and est.n_features_in_ == 7 and not hasattr(est, "feature_names_in_")
    np.testing.assert_allclose(est.mean_, ref.mean_, rtol=1e-15)
    np.testing.assert_allclose(est.var_, ref.var_, rtol=1e-11)
    y = est.transform(X)
    assert isinstance(y, da.Array) and y.dtype == dtype and y.chunks == X.chunks
    ref_y = ref.transform(x)
    np.testing.assert_allclose(y.compute(), ref_y, rtol=1e-6 if dtype == np.float32 else 1e-9, atol=1e-6)
    # Given the same statistics the chunk-wise transform is the NumPy transform, bit for bit.
    np.testing.assert_array_equal(ref.transform(X).compute(), ref_y)


def test_partial_fit_over_dask_and_numpy_batches_equals_one_fit(rng, scheduler):
    x = data(rng, n=900)
    est = BatchNormTransformer()
    est.partial_fit(da.from_array(x[:400], chunks=(70, 7)))
    est.partial_fit(x[400:700])
    est.partial_fit(da.from_array(x[700:], chunks=(33, 2)))
    ref = BatchNormTransformer().fit(x)
    assert est.n_samples_seen_ == 900
    np.testing.assert_allclose(est.mean_, ref.mean_, rtol=1e-15)
    np.testing.assert_allclose(est.var_, ref.var_, rtol=1e-11)


def test_transform_is_lazy(rng):
    x = data(rng)
    est = BatchNormTransformer().fit(x)
    X = da.from_array(x, chunks=(100, 7))
    with Counter() as counter:
        y = est.transform(X)
        assert counter.tasks == 0  # building the graph computes nothing
        assert isinstance(y, da.Array) and y.shape == x.shape and y.numblocks == X.numblocks
        first = y[:100].compute()
    assert 0 < counter.tasks < X.npartitions  # only what the slice needs
    np.testing.assert_array_equal(first, est.transform(x[:100]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inverse_transform_is_lazy_and_equals_numpy(rng, dtype):
    """It used to compute the whole array and return NumPy (with a FutureWarning)."""
    x = data(rng, dtype=dtype)
    est = BatchNormTransformer(gamma=2.0, beta=0.5).fit(x)
    Y = est.transform(da.from_array(x, chunks=(130, 3)))
    with Counter() as counter:
        back = est.inverse_transform(Y)
        assert counter.tasks == 0 and isinstance(back, da.Array) and back.chunks == Y.chunks
    assert back.dtype == dtype
    np.testing.assert_array_equal(back.compute(), est.inverse_transform(est.transform(x)))
    bad = np.array(Y.compute())
    bad[5, 1] = np.nan
    lazy = est.inverse_transform(da.from_array(bad, chunks=(130, 3)))
    with pytest.raises(ValueError, match="Input X contains NaN.\nBatchNormTransformer does not accept"):
        lazy.compute()  # the message NumPy input gets, naming the estimator


def test_int_dask_input_is_float64_like_numpy(rng):
    x = rng.integers(0, 10, (50, 3))
    est = BatchNormTransformer().fit(da.from_array(x, chunks=(20, 3)))
    ref = BatchNormTransformer().fit(x)
    np.testing.assert_allclose(est.mean_, ref.mean_, rtol=1e-15)
    y = est.transform(da.from_array(x, chunks=(20, 3)))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.compute(), ref.transform(x), rtol=1e-12)


def test_errors_and_state_kept(rng):
    x = data(rng, n=40, p=3)
    est = BatchNormTransformer().fit(x)
    mean = est.mean_.copy()
    bad = x.copy()
    bad[37, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.fit(da.from_array(bad, chunks=(10, 3)))
    np.testing.assert_array_equal(est.mean_, mean)  # previous fit kept
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.transform(da.from_array(bad, chunks=(10, 3))).compute()  # lazy: raises when computed
    with pytest.raises(ValueError, match="X has 2 features, but BatchNormTransformer is expecting 3"):
        est.transform(da.from_array(x[:, :2], chunks=10))
    with pytest.raises(ValueError, match="2D Dask array"):
        est.partial_fit(da.from_array(x[:, 0], chunks=10))
    with pytest.raises(ValueError, match="0 sample"):
        BatchNormTransformer().fit(da.zeros((0, 3), chunks=(1, 3)))
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\) \(shape=\(0, 3\)\)"):
        est.transform(da.zeros((0, 3), chunks=(1, 3)))  # as the NumPy path (which says the same)
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\) \(shape=\(0, 3\)\)"):
        est.transform(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        BatchNormTransformer(momentum=0.5).fit(da.from_array(x[:1], chunks=1))
    with pytest.raises(ValueError, match="numeric"):
        BatchNormTransformer().fit(da.from_array(np.array([["a", "b"]] * 3), chunks=2))
    fresh = BatchNormTransformer()
    with pytest.raises(ValueError, match="Input X contains infinity"):
        fresh.fit(da.from_array(np.where(bad != bad, np.inf, bad), chunks=(10, 3)))
    assert not hasattr(fresh, "n_features_in_")  # a failed first fit leaves nothing
    with pytest.raises(TypeError, match="X must be a dask.array.Array"):
        nd.moments(x)
    with pytest.raises(ValueError, match="axis must be an int"):
        nd.moments(da.from_array(x), axis=2)
    with pytest.raises(ValueError, match="only the eval-mode"):
        nd.transform(da.from_array(x), *([np.ones(3)] * 4), eps=1e-5, training=True)


@pytest.mark.parametrize("bad", [0, 1, 2, 3])
def test_transform_checks_the_parameter_lengths_eagerly(bad):
    """Parameters of the wrong length raise at once, naming the parameter and the
    counts -- not at compute time, with one chunk's slice of them."""
    names = ["gamma", "beta", "running_mean", "running_var"]
    params = [np.ones(3)] * 4
    params[bad] = np.ones(2)
    with pytest.raises(
        ValueError, match=rf"{names[bad]} must have one value per channel of X \(3 channels\), got 2 values"
    ):
        nd.transform(da.zeros((4, 3), chunks=2), *params, eps=1e-5)
    params[bad] = np.ones((3, 1))
    with pytest.raises(ValueError, match=rf"{names[bad]} must .* got an array of shape \(3, 1\)"):
        nd.transform(da.zeros((4, 3), chunks=2), *params, eps=1e-5)


def test_transformer_finds_dask_support_without_importing_it():
    """The transformer names no Dask code: Dask support registers itself, loaded by the
    transformer only once dask.array is imported, and a Dask array still gets the lazy path."""
    code = (
        "import sys, numpy as np\n"
        "from numbabn.sklearn import BatchNormTransformer\n"
        "X = np.arange(40.0).reshape(10, 4)\n"
        "BatchNormTransformer().fit(X).transform(X)\n"
        "assert 'numbabn.distributed.dask' not in sys.modules and 'dask' not in sys.modules\n"
        "import dask.array as da\n"
        "Y = BatchNormTransformer().fit(da.from_array(X, chunks=(5, 2)))"
        ".transform(da.from_array(X, chunks=(5, 2)))\n"
        "assert isinstance(Y, da.Array) and 'numbabn.distributed.dask' in sys.modules\n"
        "ref = BatchNormTransformer().fit(X).transform(X)\n"
        "assert np.allclose(Y.compute(), ref, rtol=1e-12, atol=1e-12)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
