"""scikit-learn estimators built on numbabn's kernels and layers.

* :class:`BatchNormTransformer` -- batch-norm inference as a transformer, statistics
  learnt exactly (Chan merge of batch moments) or as a moving average.
* :class:`BNMLPClassifier`, :class:`BNMLPRegressor` -- multi-layer perceptrons with
  batch norm, mirroring scikit-learn's MLPClassifier / MLPRegressor.
"""

from .mlp import BNMLPClassifier, BNMLPRegressor
from .transformer import BatchNormTransformer

__all__ = ["BNMLPClassifier", "BNMLPRegressor", "BatchNormTransformer"]
