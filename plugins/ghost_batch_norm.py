"""Ghost batch norm (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better",
Algorithm 1): batch statistics over small virtual ("ghost") batches."""

from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from numbabn._typing import FloatArray
from numbabn.functional import batch_norm_backward
from numbabn.layers import BatchNormBase
from numbabn.layers.base import check_positive_int


class GhostBatchNorm(BatchNormBase):
    """Batch norm whose statistics come from virtual batches of ``virtual_batch_size``
    samples: x[0:B], x[B:2B], ... (the last one may be smaller) are each normalised
    with their own mean and variance::

        y[k] = gamma * (x[k] - mean_k) / sqrt(var_k + eps) + beta     k = virtual batch

    Each virtual batch is one ``batch_norm_forward`` call writing into its slice of
    the output, so the running statistics are updated once per virtual batch (as in
    the paper's reference code, which applies a BatchNorm module to each chunk).
    Eval mode with tracked statistics normalises the whole batch with the running
    ones; without them it uses the virtual batches' statistics, like training.

    Input (N, C, ...), channels on axis 1; with N <= virtual_batch_size it is plain
    batch norm (an empty batch included: one call, counted once).
    """

    _transient = ("_parts",)

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | None = None,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, dtype)
        self.virtual_batch_size = check_positive_int(type(self).__name__, "virtual_batch_size", virtual_batch_size)
        self._parts = None

    def _slices(self, x: FloatArray) -> list[slice]:
        N, B = x.shape[0], self.virtual_batch_size
        per_sample = x.size // max(N, 1) // self.num_features
        last = N - B * ((N - 1) // B)
        if last * per_sample <= 1:
            raise ValueError(
                f"{self._short()}: the last virtual batch of an input of shape {x.shape} holds "
                f"{last * per_sample} value(s) per channel; batch statistics need more than 1"
            )
        return [slice(i, i + B) for i in range(0, N, B)]

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._check_input(x)
        gamma, beta = self._affine_values()
        if not self.uses_batch_stats or x.size == 0:
            # Running statistics, or an empty batch (one call: the counter counts it once).
            y, ctx = self._bn_forward(x, gamma, beta)
            self._parts = (x.shape, x.dtype, [(slice(None), ctx)])
            return y
        # Contiguous slices along N of a C-contiguous array are C-contiguous, so each
        # call reads its part of x and writes its part of y without copies.
        x = np.ascontiguousarray(x)
        y = np.empty_like(x)
        self._parts = (
            x.shape,
            x.dtype,
            [(s, self._bn_forward(x[s], gamma, beta, out=y[s])[1]) for s in self._slices(x)],
        )
        return y

    def backward(self, dy: FloatArray) -> FloatArray:
        """dx per virtual batch; gamma/beta gradients summed over the virtual batches."""
        shape, dtype, parts = self._cached("_parts")
        dy = np.ascontiguousarray(self._check_dy(dy, shape, dtype))
        dx = np.empty_like(dy)
        grads = [batch_norm_backward(dy[s], ctx, out=dx[s])[1:] for s, ctx in parts]
        if self.affine:
            self.weight.grad = np.sum([dg for dg, _ in grads], axis=0)
            self.bias.grad = np.sum([db for _, db in grads], axis=0)
        return dx

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["GhostBatchNorm", FloatArray]:
        layer = cls(3, virtual_batch_size=3, dtype=dtype)._randomize_state(rng)
        return layer, rng.standard_normal((8, 3, 2)).astype(dtype)
