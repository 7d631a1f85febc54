"""Plain NumPy float64 batch norm: the textbook formulas, no Numba, no tricks.

This is the oracle every kernel is tested against. ``axis`` is the channel axis;
statistics reduce over every other axis (m values per channel). All results are
float64. The backward uses the chain rule through mean and variance (Ioffe &
Szegedy 2015, Sec. 3), deliberately not the compact form the kernels use.
"""

import numpy as np


def _reduce_axes(x, axis):
    axis = axis % x.ndim
    return tuple(i for i in range(x.ndim) if i != axis), axis


def _bcast(v, x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def moments(x, axis=1):
    """(count, mean, m2) per channel: m values, mean, sum of squared deviations."""
    x = np.asarray(x, dtype=np.float64)
    axes, axis = _reduce_axes(x, axis)
    count = x.size // x.shape[axis]
    mean = x.mean(axis=axes)
    m2 = ((x - _bcast(mean, x, axis)) ** 2).sum(axis=axes)
    return count, mean, m2


def forward(x, gamma=None, beta=None, *, mean=None, var=None, eps=1e-5, axis=1, relu=False, residual=None):
    """y = gamma*(x - mean)/sqrt(var + eps) + beta (+ residual) (then max(y, 0) if relu).

    Batch statistics (biased var) when ``mean``/``var`` are None, otherwise the given
    ones (eval mode with running statistics). Returns (y, mean, var), all float64.
    """
    x = np.asarray(x, dtype=np.float64)
    if mean is None:
        count, mean, m2 = moments(x, axis)
        var = m2 / count
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    xhat = (x - _bcast(mean, x, axis)) / np.sqrt(_bcast(var, x, axis) + eps)
    y = xhat
    if gamma is not None:
        y = y * _bcast(gamma, x, axis)
    if beta is not None:
        y = y + _bcast(beta, x, axis)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    return y, mean, var


def update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's rule, returning new float64 arrays:
    rm' = (1-momentum)*rm + momentum*mean; rv' = (1-momentum)*rv + momentum*var*m/(m-1)."""
    rm = (1.0 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    rv = (1.0 - momentum) * np.asarray(running_var, np.float64) + momentum * var * count / (count - 1)
    return rm, rv


def backward(
    dy, x, gamma=None, beta=None, *, mean=None, var=None, eps=1e-5, axis=1, relu=False, training=True, residual=None
):
    """Gradients (dx, dgamma, dbeta) of sum(dy * forward(x)) by the chain rule; with a
    ``residual`` (added before the ReLU) (dx, dgamma, dbeta, dresidual).

    ``training=True``: mean/var are the batch statistics (recomputed when None) and
    depend on x. ``training=False``: mean/var are constants (running statistics).
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes, axis = _reduce_axes(x, axis)
    y, mean, var = forward(x, gamma, beta, mean=mean, var=var, eps=eps, axis=axis, relu=relu, residual=residual)
    if relu:
        dy = np.where(y <= 0, 0.0, dy)  # PyTorch's ReLU mask: a NaN output passes the gradient
    if residual is not None:
        return (
            *backward(
                dy,
                x,
                gamma,
                beta,
                mean=mean if not training else None,
                var=var if not training else None,
                eps=eps,
                axis=axis,
                training=training,
            ),
            dy,
        )
    mu = _bcast(mean, x, axis)
    v = _bcast(var, x, axis)
    g = _bcast(1.0 if gamma is None else gamma, x, axis)
    xhat = (x - mu) / np.sqrt(v + eps)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat = dy * g
    if not training:
        return dxhat / np.sqrt(v + eps), dgamma, dbeta
    m = x.size // x.shape[axis]
    dvar = (dxhat * (x - mu) * -0.5 * (v + eps) ** -1.5).sum(axis=axes, keepdims=True)
    dmean = (-dxhat / np.sqrt(v + eps)).sum(axis=axes, keepdims=True) + dvar * (-2.0 * (x - mu)).sum(
        axis=axes, keepdims=True
    ) / m
    dx = dxhat / np.sqrt(v + eps) + dvar * 2.0 * (x - mu) / m + dmean / m
    return dx, dgamma, dbeta
