"""Losses: ``loss_fn(prediction, target) -> (loss, dprediction)``.

The loss is a Python float, the mean over the batch; the gradient has the
prediction's shape and dtype and is what the network's ``backward`` takes. An
empty batch has a NaN loss (the mean of nothing, as in PyTorch) and an empty
gradient, without a warning.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .. import _checks as V
from .._typing import FloatArray


class _Loss:
    # Defined by each subclass; declared here for the type checker.
    forward: Callable[[Any, Any], tuple[float, FloatArray]]

    def __call__(self, prediction: FloatArray, target: ArrayLike) -> tuple[float, FloatArray]:
        return self.forward(prediction, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _prediction(self, prediction: Any) -> FloatArray:
        if not isinstance(prediction, np.ndarray) or prediction.dtype.kind != "f":
            raise TypeError(f"{self!r}: prediction must be a floating-point NumPy array, got {V.describe(prediction)}")
        return prediction


class SoftmaxCrossEntropy(_Loss):
    """Mean cross-entropy of softmax(logits) against integer class labels.

    logits z (N, K), labels t (N,) in [0, K)::

        loss    = (1/N) sum_n [ logsumexp(z_n) - z_n[t_n] ]
        dlogits = (softmax(z) - onehot(t)) / N

    logsumexp(z) = max(z) + log(sum exp(z - max(z))) never overflows.
    """

    def forward(self, logits: FloatArray, labels: ArrayLike) -> tuple[float, FloatArray]:
        z = self._prediction(logits)
        if z.ndim != 2:
            raise ValueError(f"{self!r}: logits must have shape (N, K), got {z.shape}")
        N, K = z.shape
        t = np.asarray(labels)
        if t.shape != (N,) or t.dtype.kind not in "iu":
            raise ValueError(f"{self!r}: labels must be integers of shape ({N},), got {V.describe(t)}")
        if N and (t.min() < 0 or t.max() >= K):
            raise ValueError(f"{self!r}: labels must lie in [0, {K}), got values in [{t.min()}, {t.max()}]")
        if not N:
            return float("nan"), np.zeros_like(z)
        shifted = z - z.max(axis=1, keepdims=True)
        rows = np.arange(N)
        # Probabilities of far smaller logits underflow to 0 by design: not an error,
        # also under np.seterr(all="raise") (how users hunt their own NaNs).
        with np.errstate(under="ignore"):
            p = np.exp(shifted)
            total = p.sum(axis=1, keepdims=True)
            loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, t]))
            p /= total
            p[rows, t] -= 1
            p /= N
        return loss, p


class MSELoss(_Loss):
    """Mean squared error over all elements (PyTorch's reduction='mean').

    With S = pred.size::

        loss = (1/S) sum (pred - target)^2
        dpred = 2 (pred - target) / S
    """

    def forward(self, prediction: FloatArray, target: ArrayLike) -> tuple[float, FloatArray]:
        pred = self._prediction(prediction)
        target = np.asarray(target)
        if target.shape != pred.shape:
            raise ValueError(f"{self!r}: target must have the prediction's shape {pred.shape}, got {target.shape}")
        diff = pred - target.astype(pred.dtype, copy=False)
        if not diff.size:
            return float("nan"), diff
        loss = float(np.mean(diff * diff, dtype=np.float64))
        diff *= 2.0 / pred.size
        return loss, diff
