"""Losses: ``loss_fn(prediction, target, sample_weight=None) -> (loss, dprediction)``.

The loss is a Python float, the mean over the batch; the gradient has the
prediction's shape and dtype and is what the network's ``backward`` takes. An
empty batch has a NaN loss (the mean of nothing, as in PyTorch) and an empty
gradient, without a warning.

``sample_weight`` (N,) (finite, >= 0, one per sample) makes the mean a weighted one,
as scikit-learn's MLP losses: with l_n the loss of sample n and W = sum_n w_n::

    loss = (1/W) sum_n w_n l_n ,   dprediction_n = (w_n/W) dl_n/dprediction_n

(all weights 1 give the unweighted loss, up to rounding). Weights summing to 0 weigh
nothing: a NaN loss (a weighted mean of nothing) and a zero gradient.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import _checks as V
from .._typing import FloatArray


class _Loss:
    # Defined by each subclass; declared here for the type checker.
    forward: Callable[..., tuple[float, FloatArray]]

    def __call__(
        self, prediction: FloatArray, target: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> tuple[float, FloatArray]:
        return self.forward(prediction, target, sample_weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _prediction(self, prediction: Any) -> FloatArray:
        if not isinstance(prediction, np.ndarray) or prediction.dtype.kind != "f":
            raise TypeError(f"{self!r}: prediction must be a floating-point NumPy array, got {V.describe(prediction)}")
        return prediction

    def _logits(self, logits: Any) -> FloatArray:
        z = self._prediction(logits)
        if z.ndim != 2:
            raise ValueError(f"{self!r}: logits must have shape (N, K), got {z.shape}")
        return z

    def _like(self, z: FloatArray, target: Any, kinds: str, name: str, needed: str) -> NDArray[Any]:
        """``target`` as an array of ``z``'s shape, ``z`` of shape (N, K) (``name``), the
        target's dtype kind in ``kinds``; else a ValueError: "``needed`` shape ..., got"."""
        if z.ndim != 2:
            raise ValueError(f"{self!r}: {name} must have shape (N, K), got {z.shape}")
        t = np.asarray(target)
        if t.shape != z.shape or t.dtype.kind not in kinds:
            raise ValueError(f"{self!r}: {needed} shape {z.shape}, got {V.describe(t)}")
        return t

    def _weights(self, sample_weight: Any, n: int) -> NDArray[np.float64] | None:
        """``sample_weight`` as (n,) float64 weights (:func:`numbabn._checks.check_weights`); None stays None."""
        return None if sample_weight is None else V.check_weights(repr(self), sample_weight, n)

    @staticmethod
    def _weighted(per_sample: Any, w: NDArray[np.float64], grad: FloatArray) -> float:
        """The weighted mean of ``per_sample`` losses; scales the rows of ``grad`` (the
        per-sample gradients) by w_n/W in place. Weights summing to 0: NaN, zero gradient."""
        total = float(w.sum())
        if total == 0.0:
            grad[...] = 0
            return float("nan")
        scale = (w / total).astype(grad.dtype)
        grad *= scale.reshape((-1,) + (1,) * (grad.ndim - 1))
        return float(np.dot(w, per_sample) / total)


class SoftmaxCrossEntropy(_Loss):
    """Mean cross-entropy of softmax(logits) against integer class labels.

    logits z (N, K), labels t (N,) in [0, K)::

        loss    = (1/N) sum_n [ logsumexp(z_n) - z_n[t_n] ]
        dlogits = (softmax(z) - onehot(t)) / N

    (with ``sample_weight``, the weighted mean: see the module docstring).

    logsumexp(z) = max(z) + log(sum exp(z - max(z))) never overflows.
    """

    def forward(
        self, logits: FloatArray, labels: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> tuple[float, FloatArray]:
        z = self._logits(logits)
        N, K = z.shape
        t = np.asarray(labels)
        if t.shape != (N,) or t.dtype.kind not in "iu":
            raise ValueError(f"{self!r}: labels must be integers of shape ({N},), got {V.describe(t)}")
        if N and (t.min() < 0 or t.max() >= K):
            raise ValueError(f"{self!r}: labels must lie in [0, {K}), got values in [{t.min()}, {t.max()}]")
        w = self._weights(sample_weight, N)
        if not N:
            return float("nan"), np.zeros_like(z)
        shifted = z - z.max(axis=1, keepdims=True)
        rows = np.arange(N)
        # Probabilities of far smaller logits underflow to 0 by design: not an error,
        # also under np.seterr(all="raise") (how users hunt their own NaNs).
        with np.errstate(under="ignore"):
            p = np.exp(shifted)
            total = p.sum(axis=1, keepdims=True)
            per_sample = np.log(total[:, 0]) - shifted[rows, t]
            p /= total
            p[rows, t] -= 1
            if w is not None:
                return self._weighted(per_sample, w, p), p
            p /= N
        return float(np.mean(per_sample)), p


class SigmoidBinaryCrossEntropy(_Loss):
    """Binary cross-entropy of sigmoid(logits) against 0/1 targets, summed over the K
    labels of a sample and averaged over the N samples (scikit-learn's multilabel
    ``binary_log_loss``; PyTorch's ``BCEWithLogitsLoss`` would also average over K).

    logits z (N, K), targets t (N, K) of 0 and 1::

        loss    = (1/N) sum_n sum_k [ softplus(z_nk) - t_nk z_nk ]
        dlogits = (sigmoid(z) - t) / N

    (with ``sample_weight``, the weighted mean over samples: see the module docstring).
    ``softplus(z) = max(z, 0) + log1p(exp(-abs(z)))`` never overflows.
    """

    def forward(
        self, logits: FloatArray, targets: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> tuple[float, FloatArray]:
        z = self._logits(logits)
        t = np.asarray(targets)
        if t.shape != z.shape or not np.isin(t, (0, 1)).all():
            raise ValueError(f"{self!r}: targets must be 0s and 1s of the logits' shape {z.shape}, got {V.describe(t)}")
        w = self._weights(sample_weight, z.shape[0])
        if not z.size:
            return float("nan"), np.zeros_like(z)
        t = t.astype(z.dtype, copy=False)
        with np.errstate(under="ignore"):  # exp(-|z|) of large |z| underflows to 0 by design
            e = np.exp(-np.abs(z))
            per_sample = (np.maximum(z, 0) + np.log1p(e) - t * z).sum(axis=1, dtype=np.float64)
            # sigmoid(z) - t from q = min(sigmoid, 1 - sigmoid): exact also where it is tiny
            q = e / (1 + e)
            grad = np.where(z >= 0, (1 - t) - q, q - t)
        if w is not None:
            return self._weighted(per_sample, w, grad), grad
        grad /= z.shape[0]
        return float(np.mean(per_sample)), grad


class MSELoss(_Loss):
    """Mean squared error over all elements (PyTorch's reduction='mean').

    With S = pred.size::

        loss = (1/S) sum (pred - target)^2
        dpred = 2 (pred - target) / S

    ``target``: real numbers (or bools) of the prediction's shape.

    With ``sample_weight``, the weighted mean over samples of each sample's mean
    squared error (rows of ``pred``; see the module docstring).
    """

    def forward(
        self, prediction: FloatArray, target: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> tuple[float, FloatArray]:
        pred = self._prediction(prediction)
        target = np.asarray(target)
        if target.shape != pred.shape:
            raise ValueError(f"{self!r}: target must have the prediction's shape {pred.shape}, got {target.shape}")
        if target.dtype.kind not in "biuf":
            # astype turned a None of an object target into NaN (a NaN loss, silently),
            # and strings into NumPy's own error
            raise ValueError(
                f"{self!r}: target must be real numbers of the prediction's shape {pred.shape}, "
                f"got {V.describe(target)}"
            )
        w = self._weights(sample_weight, pred.shape[0] if pred.ndim else 1)
        diff = pred - target.astype(pred.dtype, copy=False)
        if not diff.size:
            return float("nan"), diff
        if w is not None:
            # per sample: the mean of its K = size/N squared errors, gradient 2*diff/K
            per_sample = np.mean((diff * diff).reshape(len(w), -1), axis=1, dtype=np.float64)
            diff *= 2.0 * len(w) / pred.size
            return self._weighted(per_sample, w, diff), diff
        loss = float(np.mean(diff * diff, dtype=np.float64))
        diff *= 2.0 / pred.size
        return loss, diff


class HalfSquaredError(_Loss):
    """Half the squared error, summed over the K outputs of a sample and averaged over
    the N samples: the loss whose gradient scikit-learn's ``MLPRegressor`` (squared
    error) steps with. predictions (N, K), targets (N, K) of real numbers::

        loss  = (1/N) sum_n (1/2) sum_k (pred_nk - target_nk)^2
        dpred = (pred - target) / N

    (with ``sample_weight``, the weighted mean over samples: see the module docstring).
    For one output this is scikit-learn's squared loss; for K outputs scikit-learn
    reports its loss divided by K (the mean over outputs, too) while its gradient is
    this one's. :class:`MSELoss` (PyTorch's) is 2/K times this loss.
    """

    def forward(
        self, prediction: FloatArray, target: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> tuple[float, FloatArray]:
        pred = self._prediction(prediction)
        target = self._like(pred, target, "biuf", "predictions", "target must be real numbers of the prediction's")
        w = self._weights(sample_weight, pred.shape[0])
        diff = pred - target.astype(pred.dtype, copy=False)
        if not diff.size:
            return float("nan"), diff
        per_sample = 0.5 * np.sum(diff * diff, axis=1, dtype=np.float64)
        if w is not None:
            return self._weighted(per_sample, w, diff), diff
        diff /= pred.shape[0]
        return float(np.mean(per_sample)), diff


class PoissonDeviance(_Loss):
    """Half the Poisson deviance of the mean exp(z) against counts y >= 0, summed over
    the K outputs of a sample and averaged over the N samples (scikit-learn's
    ``MLPRegressor(loss="poisson")``, whose output activation is exp: the log link).
    log-means z (N, K), targets y (N, K), finite and >= 0::

        loss = (1/N) sum_n sum_k [ y log(y) - y - y z + exp(z) ]    (0 log 0 = 0)
        dz   = (exp(z) - y) / N

    (with ``sample_weight``, the weighted mean over samples: see the module docstring).
    The loss is 0 where exp(z) = y. exp(z) overflows to inf for z > ~88 in float32 (709
    in float64): an infinite loss, which training reports as divergence.
    """

    def forward(
        self, log_mean: FloatArray, targets: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> tuple[float, FloatArray]:
        z = self._prediction(log_mean)
        y = self._like(z, targets, "iuf", "log-means", "targets must be numbers of the log-means'")
        if y.size and not (np.isfinite(y).all() and y.min() >= 0):
            raise ValueError(f"{self!r}: targets must be finite and >= 0 (counts or rates), got min {y.min()}")
        w = self._weights(sample_weight, z.shape[0])
        if not z.size:
            return float("nan"), np.zeros_like(z)
        y = y.astype(z.dtype, copy=False)
        with np.errstate(over="ignore", under="ignore"):  # exp(z) of extreme z: inf or 0 by design
            mu = np.exp(z)
            y64 = y.astype(np.float64)
            ylogy = y64 * np.log(np.where(y64 > 0, y64, 1.0))  # 0 where y = 0
            per_sample = (ylogy - y64 - y64 * z + mu).sum(axis=1, dtype=np.float64)
            grad = mu - y
        if w is not None:
            return self._weighted(per_sample, w, grad), grad
        grad /= z.shape[0]
        return float(np.mean(per_sample)), grad
