"""Containers: layers made of layers."""

from collections.abc import Iterator
from typing import Any, overload

import numpy as np

from .._typing import FloatArray
from .base import Layer, capture, forget_caches, restore
from .batchnorm import BatchNorm1d
from .linear import Linear


class Sequential(Layer):
    """Chains layers: ``forward`` runs them in order, ``backward`` in reverse.

    ``seq[i]`` is the i-th layer, ``seq[i:j]`` a Sequential of the *same* layer
    objects (shared parameters, so ``opt.step(seq[:i].parameters())`` updates the
    first i layers of ``seq``), ``len(seq)``, ``iter(seq)`` and ``seq.layers``
    (a tuple) work as expected. State-dict keys are "<index>.<name>". A slice takes
    ``seq``'s own training flag and changes no layer's: each keeps its mode (a
    layer put in eval mode inside a training ``seq`` stays so).

    ``forward`` and ``backward`` are all or nothing: if a layer raises, every layer
    of the chain is put back as it was (running statistics, caches, gradients), but
    for one thing: a forward that fails after its first layer took the input leaves
    no layer with the previous forward's cache (a backward needs a new forward), as
    holding those caches until the end of every forward doubled its peak memory.

    Examples
    --------
    >>> import numpy as np
    >>> from numbabn.layers import Linear, ReLU, Sequential
    >>> rng = np.random.default_rng(0)
    >>> model = Sequential(Linear(3, 4, rng=rng), ReLU(), Linear(4, 2, rng=rng))
    >>> y = model.forward(np.ones((5, 3), np.float32))
    >>> y.shape, y.dtype
    ((5, 2), dtype('float32'))
    >>> model.backward(np.ones_like(y)).shape
    (5, 3)
    >>> len(model), len(model[1:]), model[1:][0] is model[1]
    (3, 2, True)
    """

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_child(str(i), layer)
        self.layers = tuple(layers)

    # All or nothing: when a layer raises, the layers before it have already updated
    # their running statistics and caches (forward) or gradients (backward); they are
    # put back, so a failed call leaves the whole chain as it was. One exception: once
    # the first layer took the input, the last forward's caches are let go (kept to be
    # put back, they made every forward hold two steps' activations at once), so a
    # failure further on leaves the layers needing a new forward before a backward.
    def forward(self, x: FloatArray) -> FloatArray:
        saved = capture(self, backward=False)
        try:
            for i, layer in enumerate(self.layers):
                x = layer.forward(x)
                if i == 0:
                    forget_caches(saved, drop_live_but=layer)
        except Exception:
            restore(saved)
            raise
        return x

    def backward(self, dy: FloatArray) -> FloatArray:
        saved = capture(self, forward=False)
        try:
            for layer in reversed(self.layers):
                dy = layer.backward(dy)
        except Exception:
            restore(saved)
            raise
        return dy

    @overload
    def __getitem__(self, index: int) -> Layer: ...
    @overload
    def __getitem__(self, index: slice) -> "Sequential": ...
    def __getitem__(self, index: int | slice) -> "Layer | Sequential":
        if isinstance(index, slice):
            part = Sequential(*self.layers[index])
            part.training = self.training  # not .train(): that would set the shared layers' modes
            return part
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["Sequential", FloatArray]:
        layer = cls(
            Linear(3, 4, rng=rng, dtype=dtype),
            BatchNorm1d(4, dtype=dtype, activation="relu"),
            Linear(4, 2, rng=rng, dtype=dtype),
        )
        return layer, rng.standard_normal((6, 3)).astype(dtype)
