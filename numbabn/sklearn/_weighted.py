"""The BN-MLPs' losses: scikit-learn's L2 penalty per sample, or per unit of weight.

scikit-learn's MLPs divide a mini-batch's penalty by the batch's size N, or with
``sample_weight`` (>= 1.7) by its weight sum S: the step's gradient is
``(sum_n w_n dl_n + alpha*W) / S`` for each weight matrix W. The loss of
:mod:`numbabn.layers` gives the first term (its mean, weighted or not); the second is
the optimizer's weight decay, which therefore changes from batch to batch (an epoch's
last batch may be smaller): these losses set it to ``alpha / N``, or ``alpha / S``
with weights, right before the step that uses it (0 for a batch whose weights sum
to 0: that step has a zero data gradient too). Each call with weights records S
(``totals``), from which the estimator averages an epoch's loss over the batches
that carry weight. The ``record_metrics`` probes call these losses too, without
weights: they put the weight decay back afterwards, and the ICS probe replays its
update with the value its own call set for the probed batch, alpha / N
(:mod:`numbabn.train.metrics`).
"""

from typing import Any

import numpy as np

from ..layers import HalfSquaredError, MSELoss, PoissonDeviance, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy


class _PenaltyPerWeight:
    """Mixin before a loss of :mod:`numbabn.layers` (see the module docstring)."""

    def __init__(self, optimizer: Any, alpha: float) -> None:
        self.optimizer, self.alpha = optimizer, float(alpha)
        self.totals: list[float] = []

    def __call__(self, prediction: Any, target: Any, sample_weight: Any = None) -> Any:
        total = float(len(target)) if sample_weight is None else float(np.sum(sample_weight))
        self.optimizer.weight_decay = self.alpha / total if total > 0 else 0.0
        if sample_weight is not None:  # (metrics call the loss too, without weights)
            self.totals.append(total)
        return super().__call__(prediction, target, sample_weight)  # type: ignore[misc]  # the loss after it


class WeightedCrossEntropy(_PenaltyPerWeight, SoftmaxCrossEntropy):
    """:class:`~numbabn.layers.SoftmaxCrossEntropy` with the penalty per unit of weight."""


class WeightedMSELoss(_PenaltyPerWeight, MSELoss):
    """:class:`~numbabn.layers.MSELoss` with the penalty per unit of weight (the
    regressor's loss before 2026-12-05, kept by the networks fitted with it)."""


class WeightedHalfSquaredError(_PenaltyPerWeight, HalfSquaredError):
    """:class:`~numbabn.layers.HalfSquaredError` with the penalty per unit of weight."""


class WeightedBinaryCrossEntropy(_PenaltyPerWeight, SigmoidBinaryCrossEntropy):
    """:class:`~numbabn.layers.SigmoidBinaryCrossEntropy` with the penalty per unit of weight."""


class WeightedPoissonDeviance(_PenaltyPerWeight, PoissonDeviance):
    """:class:`~numbabn.layers.PoissonDeviance` with the penalty per unit of weight."""


# The estimator's loss class -> its variant with the penalty per unit of weight.
WEIGHTED = {
    SoftmaxCrossEntropy: WeightedCrossEntropy,
    SigmoidBinaryCrossEntropy: WeightedBinaryCrossEntropy,
    HalfSquaredError: WeightedHalfSquaredError,
    MSELoss: WeightedMSELoss,
    PoissonDeviance: WeightedPoissonDeviance,
}
