"""The layer contract, checked for EVERY registered layer name (built-in and plugin).

Each registered class provides ``_contract_example(rng, dtype) -> (layer, x)``. Every
check builds its layers from that hook, so a new layer (or a third-party plugin that
is installed) is covered as soon as it is registered.

Finite differences run on deep copies of the example layer: each evaluation starts
from the same running statistics and random-generator state, so stateful or noisy
layers (running stats, NoisyBatchNorm) are deterministic functions for the check.
"""
import copy

import numpy as np
import pytest

from numbabn.layers import Layer
from numbabn.registry import available_layers, layer_class

from .helpers import central_diff

NAMES = list(available_layers())
BUILTIN = {"linear", "relu", "sigmoid", "tanh", "flatten", "batch_norm1d", "batch_norm2d", "conv2d", "sequential"}
PLUGINS = {"batch_renorm", "ghost_batch_norm", "noisy_batch_norm", "lp_batch_norm", "layer_norm", "group_norm"}


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
        np.testing.assert_allclose(dx, central_diff(lambda v: objective(copy.deepcopy(layer0), v), x.copy()),
                                   rtol=1e-5, atol=1e-7, err_msg="input gradient")
        grads = {q: p.grad for q, p in layer.named_parameters()}
        for qname, p0 in layer0.named_parameters():
            assert grads[qname] is not None, f"backward left {qname}.grad unset"

            def perturbed(value, qname=qname):
                trial = copy.deepcopy(layer0)
                dict(trial.named_parameters())[qname].value[...] = value
                return objective(trial, x)

            np.testing.assert_allclose(grads[qname], central_diff(perturbed, p0.value.copy()),
                                       rtol=1e-5, atol=1e-7, err_msg=f"gradient of {qname}")

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
            assert layer.forward(x.astype(np.float64)).dtype == np.float64   # dtype-free layers follow
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
        if layer.named_buffers():     # running statistics move in training mode
            after = layer.state_dict()
            assert any(not np.array_equal(before[k], after[k]) for k, _ in layer.named_buffers())

        layer.eval()
        before = layer.state_dict()
        y = layer.forward(x)
        assert_state_equal(layer.state_dict(), before)          # eval changes no state
        np.testing.assert_array_equal(layer.forward(x), y)       # and is deterministic
        k = max(1, x.shape[0] // 2)                              # and per sample
        np.testing.assert_allclose(layer.forward(x[:k]), y[:k], rtol=1e-12, atol=1e-12)

    def test_state_dict_round_trip(self, name):
        layer, x = example(name)
        saved = layer.state_dict()
        for key, value in layer._named_state():
            assert saved[key] is not value and isinstance(saved[key], np.ndarray)   # copies
        y_eval = layer.eval().forward(x)

        layer.train().forward(x)            # move buffers ...
        for p in layer.parameters():        # ... and parameters
            p.value += 0.5
        layer.load_state_dict(saved)
        assert_state_equal(layer.state_dict(), saved)
        np.testing.assert_array_equal(layer.eval().forward(x), y_eval)

        other, _ = example(name, seed=7)    # another instance takes the same state
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
        broken = [({k: v for k, v in new.items() if k != key}, ValueError, "missing"),
                  ({**new, key: np.zeros(saved[key].shape + (2,), saved[key].dtype)}, ValueError, "shape"),
                  ({**new, key: saved[key].astype(np.float16)}, TypeError, "dtype"),
                  ({**new, key: saved[key].tolist()}, TypeError, "NumPy array")]
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

    def test_repr(self, name):
        layer, _ = example(name)
        text = repr(layer)
        cls = type(layer).__name__
        assert text.startswith(cls + "(") and text.endswith(")") and "object at 0x" not in text
        assert text.count("(") == text.count(")")
        for child in layer.children():
            assert repr(child).split("\n")[0] in text
