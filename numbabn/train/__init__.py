"""Training loop and the measurement toolkit of what batch norm does (README, "What batch norm really does").

:class:`Trainer` runs mini-batch training on NumPy arrays and returns a
:class:`History`; :mod:`numbabn.train.metrics` holds the probes (internal covariate
shift, loss landscape / gradient predictiveness / effective β-smoothness along the
gradient, the top Hessian eigenvalue, activation percentiles, gradient and weight norms);
:mod:`numbabn.train.summary` the medians/IQR and win counts over seeds;
:mod:`numbabn.train.lr_search` the largest stable learning rate;
:mod:`numbabn.train.torch_adapter` runs the same probes on a PyTorch model.
:mod:`numbabn.train.experiments` (imported on demand: it needs matplotlib and
scikit-learn's data) reproduces the papers' figures at small scale.
"""

from .history import History
from .metrics import (
    ActivationPercentiles,
    GradientNorm,
    HessianEigenvalue,
    InternalCovariateShift,
    LandscapeProbe,
    Metric,
    WeightNorm,
    activation_percentiles,
    eta_grid,
    gradient_norm,
    hessian_top_eigenvalue,
    internal_covariate_shift,
    landscape_probe,
    leaf_layers,
    weight_layers,
    weight_norm,
)
from .trainer import Trainer

__all__ = [
    "ActivationPercentiles",
    "GradientNorm",
    "HessianEigenvalue",
    "History",
    "InternalCovariateShift",
    "LandscapeProbe",
    "Metric",
    "Trainer",
    "WeightNorm",
    "activation_percentiles",
    "eta_grid",
    "gradient_norm",
    "hessian_top_eigenvalue",
    "internal_covariate_shift",
    "landscape_probe",
    "leaf_layers",
    "weight_layers",
    "weight_norm",
]
