"""Containers: layers made of layers."""
from ..registry import register_layer
from .base import Layer
from .batchnorm import BatchNorm1d
from .linear import Linear


@register_layer("sequential")
class Sequential(Layer):
    """Chains layers: ``forward`` runs them in order, ``backward`` in reverse.

    ``seq[i]`` is the i-th layer, ``seq[i:j]`` a Sequential of the *same* layer
    objects (shared parameters, so ``opt.step(seq[:i].parameters())`` updates the
    first i layers of ``seq``), ``len(seq)``, ``iter(seq)`` and ``seq.layers``
    (a tuple) work as expected. State-dict keys are "<index>.<name>".
    """

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_child(str(i), layer)
        self.layers = tuple(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self.layers[index]).train(self.training)
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @classmethod
    def _contract_example(cls, rng, dtype):
        layer = cls(Linear(3, 4, rng=rng, dtype=dtype), BatchNorm1d(4, dtype=dtype, activation="relu"),
                    Linear(4, 2, rng=rng, dtype=dtype))
        return layer, rng.standard_normal((6, 3)).astype(dtype)
