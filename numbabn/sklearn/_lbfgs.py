"""The BN-MLPs' ``solver="lbfgs"``: scikit-learn's full-batch L-BFGS-B
(``scipy.optimize.minimize``) over every parameter of the network.

The objective at parameters theta (each Linear's weight and bias, batch norm's gamma
and beta), on all n training samples at once::

    f(theta) = loss(network(X; theta), y) + alpha/(2S) * sum over weight matrices ||W||^2

with the network in training mode, so every batch norm normalises with the statistics
of the whole training set; ``loss`` is the estimator's (the weighted mean with
``sample_weight``) and S is n, or the weight sum. The gradient is one backward pass
plus alpha*W/S. scipy works in float64; a float32 network computes f and its gradient
in float32 (its parameters are rounded to float32 at every evaluation).

The running statistics stay frozen while the search runs (batch-norm momentum 0: the
line search evaluates trial points that are not steps), and are then set to the
statistics at the solution: one training-mode pass with momentum 1 (mean and
unbiased variance of the n samples, as a batch-norm layer keeps them), so that
``predict`` normalises as the objective did.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray


def objective(
    model: Any, loss: Callable[..., Any], X: NDArray[Any], targets: NDArray[Any], weights: Any, alpha: float
) -> tuple[NDArray[np.float64], Callable[[NDArray[np.float64]], tuple[float, NDArray[np.float64]]]]:
    """(theta0, f): the network's parameters as one float64 vector, and
    ``f(theta) -> (value, gradient)`` (module docstring), which writes theta into the
    network's parameters and leaves them there."""
    from ..layers import Linear

    params = list(model.parameters())
    decayed = {id(layer.weight) for layer in model.layers if isinstance(layer, Linear)}
    bounds = np.cumsum([0] + [p.value.size for p in params])
    spans = [(p, a, b, id(p) in decayed) for p, a, b in zip(params, bounds[:-1], bounds[1:], strict=True)]
    scale = float(alpha) / (float(len(X)) if weights is None else float(np.sum(weights)))

    def f(theta: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        for p, a, b, _ in spans:
            p.value[...] = theta[a:b].reshape(p.value.shape)  # rounded to the network's dtype
        out = model.forward(X)
        value, dout = loss(out, targets) if weights is None else loss(out, targets, weights)
        for p, *_ in spans:
            p.grad = None
        model.backward(dout)
        grad = np.empty(bounds[-1])
        squares = 0.0
        for p, a, b, decay in spans:
            grad[a:b] = p.grad.ravel()
            if decay:
                w = p.value.ravel().astype(np.float64)
                grad[a:b] += scale * w
                squares += float(w @ w)
        return float(value) + 0.5 * scale * squares, grad

    theta0 = np.concatenate([p.value.ravel().astype(np.float64) for p in params])
    return theta0, f


def fit_lbfgs(
    model: Any,
    loss: Callable[..., Any],
    X: NDArray[Any],
    targets: NDArray[Any],
    weights: Any,
    alpha: float,
    max_iter: int,
    max_fun: int,
    tol: float,
) -> Any:
    """Minimise :func:`objective` from the network's current parameters, leave the
    solution and its running statistics in the network; returns scipy's result."""
    from scipy.optimize import minimize

    from ..layers import BatchNorm1d

    norms = [layer for layer in model.layers if isinstance(layer, BatchNorm1d)]
    momenta = [layer.momentum for layer in norms]
    model.train()
    try:
        for layer in norms:
            layer.momentum = 0.0
        theta0, f = objective(model, loss, X, targets, weights, alpha)
        result = minimize(
            f, theta0, method="L-BFGS-B", jac=True, options={"maxiter": max_iter, "maxfun": max_fun, "gtol": tol}
        )
        # The solution into the network. scipy's L-BFGS-B returns the point it evaluated
        # last, but does not document it; one more evaluation makes sure.
        f(result.x)
        for layer in norms:
            layer.momentum = 1.0
        model.forward(X)
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
    return result
