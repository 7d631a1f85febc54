"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models", NeurIPS, Algorithm 1)."""

import numbers
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from numbabn._checks import check_int
from numbabn._typing import AnyArray, FloatArray
from numbabn.functional import moments
from numbabn.layers import BatchNormBase


def _relaxed(first: float, last: float, ramp: float) -> float:
    """``first + (last - first) * ramp``, and ``first`` at ramp 0 also for an
    infinite ``last`` (no clipping once relaxed), where the product would be NaN."""
    return first if ramp == 0.0 else first + (last - first) * ramp


def _ramp(t: float, start: float, end: float) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between."""
    if t < start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start) / (end - start)


class BatchRenorm(BatchNormBase):
    """Batch norm corrected towards the running statistics (Ioffe 2017, Alg. 1).

    Training, per channel over the m values of the batch (mu, sigma: running)::

        sigma_B = sqrt(var_B + eps)            sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1/rmax, rmax)
        d = clip((mu_B - mu) / sigma, -dmax, dmax)
        y = gamma * ((x - mu_B)/sigma_B * r + d) + beta          (then ReLU if fused)

    r and d are treated as constants in the backward pass (no gradient through them),
    as in the paper. With r = 1, d = 0 this is batch norm. Eval mode is plain batch
    norm with the running statistics, which is what the correction makes training
    agree with.

    Warm-up (paper §4): rmax = 1 and dmax = 0 for the first ``relax_from`` training
    steps, then linearly relaxed to reach ``rmax`` at step ``rmax_until`` and ``dmax``
    at step ``dmax_until`` (paper: 5000, 40k, 25k). The step is
    ``num_batches_tracked`` before the update. ``rmax``/``dmax`` may be ``inf``: no
    clipping once the relaxation has begun.

    Implementation: the forward is ``batch_norm_forward`` with gamma' = gamma*r and
    beta' = gamma*d + beta (r, d from ``moments`` and the running statistics before
    this step's update), so the kernel's backward is exactly the constant-(r, d)
    gradient: dgamma = r*dgamma' + d*dbeta', dbeta = dbeta'.

    Running statistics follow numbabn's (PyTorch's) rule on mean and unbiased
    variance, not the paper's moving average of sigma; sigma is derived from
    running_var. They are always tracked (the correction needs them).

    ``track_running_stats`` switched off after construction freezes the running
    statistics: training still corrects towards them but no longer updates them.

    Input (N, C, ...), channels on axis 1.
    """

    _transient = ("_rd",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        activation: str | None = None,
        dtype: DTypeLike = np.float32,
        rmax: float = 3.0,
        dmax: float = 5.0,
        relax_from: int = 5000,
        rmax_until: int = 40000,
        dmax_until: int = 25000,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, activation, dtype)
        owner = type(self).__name__
        if isinstance(rmax, bool) or not (isinstance(rmax, numbers.Real) and rmax >= 1):
            raise ValueError(f"{owner}: rmax must be a number >= 1, got {rmax!r}")
        if isinstance(dmax, bool) or not (isinstance(dmax, numbers.Real) and dmax >= 0):
            raise ValueError(f"{owner}: dmax must be a number >= 0, got {dmax!r}")
        for name, value in (("relax_from", relax_from), ("rmax_until", rmax_until), ("dmax_until", dmax_until)):
            check_int(owner, name, value, 0)
        if rmax_until < relax_from or dmax_until < relax_from:
            raise ValueError(
                f"{owner}: rmax_until and dmax_until must be >= relax_from, "
                f"got {rmax_until}, {dmax_until} < {relax_from}"
            )
        self.rmax: float = float(rmax)
        self.dmax: float = float(dmax)
        self.relax_from: int = relax_from
        self.rmax_until: int = rmax_until
        self.dmax_until: int = dmax_until
        self._rd: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None

    def limits(self) -> tuple[float, float]:
        """(rmax, dmax) in force for the next training step."""
        t = int(self.num_batches_tracked)
        return (
            _relaxed(1.0, self.rmax, _ramp(t, self.relax_from, self.rmax_until)),
            _relaxed(0.0, self.dmax, _ramp(t, self.relax_from, self.dmax_until)),
        )

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._check_input(x)
        # (r, d) go with the training forward's context: dropped only once a call that
        # replaces that context has succeeded, so that a failed one changes nothing.
        if not self.training:
            y = super().forward(x)
            self._rd = None
            return y
        batch = moments(x, axis=self.axis)
        if batch.count == 1:
            raise ValueError(
                f"{self._short()}: training needs more than 1 value per channel, got input of shape {x.shape}"
            )
        if batch.count == 0:  # empty batch: nothing to correct (batch norm's empty-batch rules)
            y = super().forward(x)
            self._rd = None
            return y
        sigma_b = np.sqrt(batch.var() + self.eps)
        sigma = np.sqrt(self.running_var.astype(np.float64) + self.eps)
        rmax, dmax = self.limits()
        r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = np.clip((batch.mean - self.running_mean) / sigma, -dmax, dmax)
        gamma: Any
        beta: Any
        gamma, beta = self._affine_values()
        if gamma is None:
            gamma, beta = 1.0, 0.0
        y, self._ctx = self._bn_forward(x, (gamma * r).astype(self.dtype), (gamma * d + beta).astype(self.dtype))
        self._rd = (r, d)
        return y

    def _bn_backward(self, dy: AnyArray) -> tuple[AnyArray, ...]:
        # r and d are constants of the backward: dgamma = r*dgamma' + d*dbeta'.
        dx, dgamma, dbeta = super()._bn_backward(dy)
        if self.affine and self._rd is not None:
            r, d = self._rd
            dgamma = (r * dgamma + d * dbeta).astype(self.dtype)
        return dx, dgamma, dbeta

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, relax_from={self.relax_from}, "
            f"rmax_until={self.rmax_until}, dmax_until={self.dmax_until}"
        )

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["BatchRenorm", FloatArray]:
        # Limits in force from step 0, and running statistics far from the batch's so
        # that r and d sit on their clip bounds: there the constant-(r, d) backward is
        # the true gradient, which the finite-difference check can verify.
        layer = cls(3, dtype=dtype, rmax=1.5, dmax=0.5, relax_from=0, rmax_until=0, dmax_until=0)
        layer._randomize_state(rng)
        layer.running_var[...] = 25.0
        layer.running_mean[...] = [10.0, -10.0, 10.0]
        return layer, rng.standard_normal((6, 3, 2)).astype(dtype)
