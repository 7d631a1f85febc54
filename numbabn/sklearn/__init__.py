"""scikit-learn estimators built on numbabn's kernels.

* :class:`BatchNormTransformer` -- batch-norm inference as a transformer, statistics
  learnt exactly (Chan merge of batch moments) or as a moving average.
"""
from .transformer import BatchNormTransformer

__all__ = ["BatchNormTransformer"]
