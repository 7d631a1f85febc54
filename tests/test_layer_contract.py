"""The layer contract, checked for EVERY registered layer name (built-in and plugin).

Each registered class provides ``_contract_example(rng, dtype) -> (layer, x)``. Every
check builds its layers from that hook, so a new layer (or a third-party plugin that
is installed) is covered as soon as it is registered.

Finite differences run on deep copies of the example layer: each evaluation starts
from the same running statistics and random-generator state, so stateful or noisy
layers (running stats, NoisyBatchNorm) are deterministic functions for the check.

Beyond the forward/backward pair, every layer must (as ``torch.nn`` modules do):
take an empty batch (N = 0) in both modes, load a partial state dict with
``strict=False`` and report the missing and unexpected keys, reset its buffers and
parameters in place, pickle without its forward caches, and either refuse float16
input with a TypeError or compute it in float32 and return float16.
"""

import copy
import math
import pickle

import numpy as np
import pytest

from numbabn.layers import Layer
from numbabn.layers.base import IncompatibleKeys
from numbabn.registry import available_layers, layer_class

from .helpers import central_diff

NAMES = list(available_layers())
BUILTIN = {
    "linear",
    "relu",
    "sigmoid",
    "tanh",
    "flatten",
    "batch_norm1d",
    "batch_norm2d",
    "batch_norm3d",
    "conv2d",
    "sequential",
}
PLUGINS = {
    "batch_renorm",
    "ghost_batch_norm",
    "noisy_batch_norm",
    "lp_batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm1d",
    "instance_norm2d",
}
# Buffers whose value at construction is known by name (PyTorch's and numbabn's conventions).
BUFFER_START = {"running_mean": 0, "running_var": 1, "running_norm": 1, "num_batches_tracked": 0}


def example(name, dtype=np.float64, seed=0):
    layer, x = layer_class(name)._contract_example(np.random.default_rng(seed), dtype)
    return layer, x


def all_layers(layer):
    yield layer
    for child in layer.children():
        yield from all_layers(child)


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a[key].dtype == b[key].dtype, key


def test_every_builtin_and_plugin_is_registered():
    assert BUILTIN | PLUGINS <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
class TestLayerContract:
    def test_example_is_the_registered_class(self, name):
        layer, x = example(name)
        assert isinstance(layer, layer_class(name)) and isinstance(layer, Layer)
        assert isinstance(x, np.ndarray) and x.dtype == np.float64

    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_backward_matches_finite_differences(self, name, mode):
        layer0, x = example(name)
        layer0.train(mode == "train")
        w = np.random.default_rng(1).standard_normal(copy.deepcopy(layer0).forward(x).shape)

        def objective(layer, inp):
            return float(np.sum(w * layer.forward(inp)))

        layer = copy.deepcopy(layer0)
        layer.forward(x)
        dx = layer.backward(w)
        np.testing.assert_allclose(
            dx,
            central_diff(lambda v: objective(copy.deepcopy(layer0), v), x.copy()),
            rtol=1e-5,
            atol=1e-7,
            err_msg="input gradient",
        )
        grads = {q: p.grad for q, p in layer.named_parameters()}
        for qname, p0 in layer0.named_parameters():
            assert grads[qname] is not None, f"backward left {qname}.grad unset"

            def perturbed(value, qname=qname):
                trial = copy.deepcopy(layer0)
                dict(trial.named_parameters())[qname].value[...] = value
                return objective(trial, x)

            np.testing.assert_allclose(
                grads[qname],
                central_diff(perturbed, p0.value.copy()),
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"gradient of {qname}",
            )

    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_float32_stays_float32(self, name, mode):
        layer, x = example(name, np.float32)
        layer.train(mode == "train")
        y = layer.forward(x)
        dx = layer.backward(np.ones_like(y))
        assert y.dtype == np.float32 and dx.dtype == np.float32 and dx.shape == x.shape
        for qname, p in layer.named_parameters():
            assert p.value.dtype == np.float32, qname
            assert p.grad is not None and p.grad.dtype == np.float32 and p.grad.shape == p.value.shape, qname
        for key, value in layer.state_dict().items():
            assert value.dtype.kind != "f" or value.dtype == np.float32, key

    def test_input_of_another_dtype_is_refused_or_followed(self, name):
        layer, x = example(name, np.float32)
        if all(sub.dtype is None for sub in all_layers(layer)):
            assert layer.forward(x.astype(np.float64)).dtype == np.float64  # dtype-free layers follow
        else:
            with pytest.raises(TypeError, match="dtype"):
                layer.forward(x.astype(np.float64))

    def test_train_and_eval(self, name):
        layer, x = example(name)
        assert layer.eval() is layer
        assert not any(sub.training for sub in all_layers(layer))
        assert layer.train() is layer
        assert all(sub.training for sub in all_layers(layer))

        before = layer.state_dict()
        layer.forward(x)
        if layer.named_buffers():  # running statistics move in training mode
            after = layer.state_dict()
            assert any(not np.array_equal(before[k], after[k]) for k, _ in layer.named_buffers())

        layer.eval()
        before = layer.state_dict()
        y = layer.forward(x)
        assert_state_equal(layer.state_dict(), before)  # eval changes no state
        np.testing.assert_array_equal(layer.forward(x), y)  # and is deterministic
        k = max(1, x.shape[0] // 2)  # and per sample
        np.testing.assert_allclose(layer.forward(x[:k]), y[:k], rtol=1e-12, atol=1e-12)

    def test_state_dict_round_trip(self, name):
        layer, x = example(name)
        saved = layer.state_dict()
        for key, value in layer._named_state():
            assert saved[key] is not value and isinstance(saved[key], np.ndarray)  # copies
        y_eval = layer.eval().forward(x)

        layer.train().forward(x)  # move buffers ...
        for p in layer.parameters():  # ... and parameters
            p.value += 0.5
        layer.load_state_dict(saved)
        assert_state_equal(layer.state_dict(), saved)
        np.testing.assert_array_equal(layer.eval().forward(x), y_eval)

        other, _ = example(name, seed=7)  # another instance takes the same state
        other.load_state_dict(saved)
        np.testing.assert_array_equal(other.eval().forward(x), y_eval)

    def test_load_state_dict_errors_leave_state_untouched(self, name):
        layer, _ = example(name)
        saved = layer.state_dict()
        with pytest.raises(ValueError, match="unexpected"):
            layer.load_state_dict({**saved, "nonexistent": np.zeros(1)})
        if not saved:
            return
        # Valid new values everywhere but the LAST key, so an implementation that
        # writes while it validates would visibly change the layer.
        new = {k: np.asarray(v + 1, dtype=v.dtype) for k, v in saved.items()}
        key = list(saved)[-1]
        broken = [
            ({k: v for k, v in new.items() if k != key}, ValueError, "missing"),
            ({**new, key: np.zeros(saved[key].shape + (2,), saved[key].dtype)}, ValueError, "shape"),
            ({**new, key: saved[key].astype(np.float16)}, TypeError, "dtype"),
            ({**new, key: saved[key].tolist()}, TypeError, "NumPy array"),
            # the values under a mask would be loaded (a negative variance, say)
            (
                {**new, key: np.ma.masked_array(new[key], mask=np.ones(new[key].shape, bool))},
                ValueError,
                "masked array with masked values",
            ),
        ]
        for state, err, match in broken:
            with pytest.raises(err, match=match):
                layer.load_state_dict(state)
            assert_state_equal(layer.state_dict(), saved)

    def test_backward_needs_forward_and_the_output_shape(self, name):
        layer, x = example(name)
        y = copy.deepcopy(layer).forward(x)
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.ones_like(y))
        layer.forward(x)
        with pytest.raises(ValueError, match="shape"):
            layer.backward(np.ones((y.shape[0] + 1,) + y.shape[1:]))
        with pytest.raises(TypeError, match="dtype"):  # as the functional API: TypeError
            layer.backward(np.ones(y.shape, np.float32))

    # ------------------------------------------------------------ torch.nn behaviours
    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_empty_batch(self, name, mode):
        """N = 0: empty output and input gradient, zero parameter gradients; float
        buffers unchanged, counters at most counting the call (training only)."""
        layer, x = example(name)
        layer.train(mode == "train")
        y_shape = copy.deepcopy(layer).forward(x).shape
        before = layer.state_dict()
        y = layer.forward(x[:0])
        assert y.shape == (0,) + y_shape[1:] and y.dtype == x.dtype
        for key, value in layer.state_dict().items():
            if value.dtype.kind == "f" or mode == "eval":
                np.testing.assert_array_equal(value, before[key], err_msg=key)
            else:
                assert int(value) - int(before[key]) in (0, 1), key
        dx = layer.backward(np.ones(y.shape))
        assert dx.shape == x[:0].shape and dx.dtype == x.dtype
        for qname, p in layer.named_parameters():
            assert p.grad is not None and p.grad.shape == p.value.shape and p.grad.dtype == p.value.dtype, qname
            assert np.all(p.grad == 0), qname
        y = layer.forward(x)  # and it goes on as before
        assert y.shape == y_shape and np.all(np.isfinite(y))

    def test_load_state_dict_strict_false(self, name):
        layer, _ = example(name)
        saved = layer.state_dict()
        result = layer.load_state_dict({"nonexistent": np.zeros(1)}, strict=False)
        assert isinstance(result, IncompatibleKeys)
        assert result.missing_keys == list(saved) and result.unexpected_keys == ["nonexistent"]
        assert_state_equal(layer.state_dict(), saved)
        assert layer.load_state_dict(saved) == ([], [])
        if not saved:
            return
        new = {k: np.asarray(v + 1, dtype=v.dtype) for k, v in saved.items()}
        first, last = list(saved)[0], list(saved)[-1]
        partial = {k: v for k, v in new.items() if k != first}
        result = layer.load_state_dict({**partial, "extra.weight": np.zeros(2)}, strict=False)
        assert result == ([first], ["extra.weight"])
        assert_state_equal(layer.state_dict(), {**partial, first: saved[first]})
        # Shapes and dtypes are still checked, before anything is written.
        layer.load_state_dict(saved)
        bad = {**partial, last: np.zeros(saved[last].shape + (2,), saved[last].dtype)}
        with pytest.raises(ValueError, match="shape"):
            layer.load_state_dict(bad, strict=False)
        assert_state_equal(layer.state_dict(), saved)
        with pytest.raises(TypeError, match="strict must be a bool"):
            layer.load_state_dict(saved, strict="no")

    def test_reset_running_stats_and_reset_parameters(self, name):
        layer, x = example(name)
        layer.train().forward(x)  # buffers move
        params = {q: p.value for q, p in layer.named_parameters()}
        values = {q: v.copy() for q, v in params.items()}
        buffers = dict(layer.named_buffers())
        assert layer.reset_running_stats() is None
        for qname, v in params.items():
            np.testing.assert_array_equal(v, values[qname], err_msg=f"{qname} changed by reset_running_stats")
        for qname, buf in layer.named_buffers():
            assert buf is buffers[qname], qname  # in place
            start = BUFFER_START.get(qname.rsplit(".", 1)[-1])
            if start is not None:
                assert np.all(buf == start), qname
        reset = layer.state_dict()
        layer.forward(x)
        layer.reset_running_stats()
        assert_state_equal(layer.state_dict(), reset)

        for p in layer.parameters():
            p.value += 0.5
        layer.forward(x)
        assert layer.reset_parameters() is None
        for qname, p in layer.named_parameters():
            assert p.value is params[qname], qname  # in place
            assert not np.array_equal(p.value, values[qname] + 0.5), f"{qname} not re-initialised"
        for key, value in layer.named_buffers():
            np.testing.assert_array_equal(value, reset[key], err_msg=key)
        y = layer.forward(x)
        assert layer.backward(np.ones_like(y)).shape == x.shape

    def test_pickle_holds_no_forward_caches(self, name):
        layer, x = example(name)
        fresh = len(pickle.dumps(layer))
        y = layer.train().forward(x)
        assert len(pickle.dumps(layer)) <= fresh + 64, "forward caches pickled"
        layer.backward(np.ones_like(y))
        grads = sum(p.value.nbytes + 200 for p in layer.parameters())
        assert len(pickle.dumps(layer)) <= fresh + grads + 64
        clone = pickle.loads(pickle.dumps(layer))
        assert_state_equal(clone.state_dict(), layer.state_dict())
        with pytest.raises(RuntimeError, match="before forward"):
            clone.backward(np.ones_like(y))
        np.testing.assert_array_equal(clone.eval().forward(x), layer.eval().forward(x))
        y = clone.train().forward(x)
        assert clone.backward(np.ones_like(y)).shape == x.shape

    def test_float16_input_refused_or_computed_in_float32(self, name):
        layer, x = example(name, np.float32)
        x16 = x.astype(np.float16)
        reference = copy.deepcopy(layer)
        try:
            y = layer.forward(x16)
        except TypeError as exc:
            assert "dtype" in str(exc)
            return
        assert y.dtype == np.float16
        y32 = reference.forward(x16.astype(np.float32))
        np.testing.assert_allclose(y.astype(np.float32), y32, rtol=2e-3, atol=2e-3)
        dx = layer.backward(np.ones_like(y))
        assert dx.dtype == np.float16 and dx.shape == x.shape
        for qname, p in layer.named_parameters():
            assert p.grad.dtype == p.value.dtype == np.float32, qname

    def test_big_endian_and_masked_input(self, name):
        layer, x = example(name)
        swapped = x.astype(x.dtype.newbyteorder(">" if x.dtype.byteorder in "=<" else "<"))
        y = copy.deepcopy(layer).forward(x)
        np.testing.assert_array_equal(copy.deepcopy(layer).forward(swapped), y)
        masked = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
        np.testing.assert_array_equal(copy.deepcopy(layer).forward(masked), y)  # nothing masked: its data
        masked[(0,) * x.ndim] = np.ma.masked
        before = layer.state_dict()
        with pytest.raises(ValueError, match="masked"):
            layer.forward(masked)
        assert_state_equal(layer.state_dict(), before)

    def test_repr(self, name):
        layer, _ = example(name)
        text = repr(layer)
        cls = type(layer).__name__
        assert text.startswith(cls + "(") and text.endswith(")") and "object at 0x" not in text
        assert text.count("(") == text.count(")")
        for child in layer.children():
            assert repr(child).split("\n")[0] in text
        if not list(layer.children()):
            # a leaf's repr lists its constructor's arguments: evaluated, it builds a
            # layer of the same repr (BatchRenorm's listed a track_running_stats it refuses)
            rebuilt = eval(text, {cls: type(layer), "inf": math.inf, "nan": math.nan})
            assert repr(rebuilt) == text
