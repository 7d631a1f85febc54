"""``BatchNormTransformer``: batch-norm inference as a scikit-learn transformer.

Per feature j, with statistics ``mean_[j]`` and ``var_[j]`` learnt by ``fit`` /
``partial_fit``::

    transform:          y = gamma * (x - mean_) / sqrt(var_ + eps) + beta
    inverse_transform:  x = (y - beta) * sqrt(var_ + eps) / gamma + mean_

``transform`` is the eval-mode pass of :func:`numbabn.batch_norm_forward`
(``training=False``, ``running_mean=mean_``, ``running_var=var_``): the Numba
kernel computes ``y = a*(x - mean_) + beta`` per element, with
``a = gamma/sqrt(var_ + eps)`` computed in float64.

Two ways to learn the statistics:

* ``momentum=None`` (exact): every batch is summarised by
  :func:`numbabn.moments` as ``Moments(n, mean, m2)`` and merged into the running
  summary with :func:`numbabn.merge_moments` (Chan et al.)::

      n = na + nb;  delta = mean_b - mean_a
      mean = mean_a + delta*nb/n;  m2 = m2_a + m2_b + delta**2 * na*nb/n

  so ``partial_fit`` over any split of the data gives the statistics of the
  concatenation, to float64 rounding; ``var_ = m2/n`` (biased, like StandardScaler).

* ``momentum=m`` (a float in (0, 1]): an exponential moving average, exactly the
  running statistics of a batch-norm layer (PyTorch's convention), starting from
  ``mean_ = 0`` and ``var_ = 1``; per batch of n >= 2 samples::

      mean_ <- (1 - m)*mean_ + m*mean_batch
      var_  <- (1 - m)*var_  + m*var_batch*n/(n - 1)       (unbiased batch variance)

With ``sample_weight`` (``fit`` and ``partial_fit``, as StandardScaler's) the batch's
mean and m2 are weighted, weight k counting a sample k times, and n is the batch's
weight sum W (a float)::

    mean = sum(w*x)/W;  m2 = sum(w*(x - mean)**2)

They merge exactly as above, and a moving-average step uses the unbiased
``m2/(W - 1)`` (weights summing to more than 1). Integer weights therefore give the
statistics of the data with each sample repeated that many times (0: left out). The
weighted moments are computed in float64 with NumPy, not by the Numba kernel, which
has no weights (per chunk for a Dask X, whose weights may be a NumPy or a Dask array).

``fit(X)`` forgets previous statistics and is one ``partial_fit(X)``. ``partial_fit``
continues in the mode ``fit`` (or the first ``partial_fit``) started: an exact summary
and a moving average are different quantities (one covers every sample equally, the
other weights recent batches and starts from 0 and 1), so a ``momentum`` switched
between None and a float after fitting raises a ``ValueError`` instead of mixing them
(``n_samples_seen_`` would count samples the statistics do not cover). A float
``momentum`` may change between ``partial_fit`` calls (a moving average with a varying
rate, as when a batch-norm layer's momentum is changed).
"""

import importlib
import sys
from collections.abc import Callable
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils import check_array
from sklearn.utils.validation import check_is_fitted, validate_data

from .._checks import check_bool, is_real
from ..functional import batch_norm_forward, moments
from ..stats import Moments, Summary, merge_summaries, weighted_moments
from ._sample_weight import check_sample_weight

FLOAT_DTYPES = (np.float64, np.float32)

# Rows per kernel call in in-place transforms (copy=False): about this many values,
# so the temporary output stays a few MB however large X is.
_INPLACE_VALUES = 1 << 20

# Fitted attributes that validate_data(reset=True) may write before it rejects X.
_NAME_ATTRS = ("n_features_in_", "feature_names_in_")


_is_real = is_real  # the shared check: a finite number, not bool


class BatchNormTransformer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Batch-norm inference as a transformer (see the module docstring for the math).

    Parameters
    ----------
    eps : float > 0, default 1e-5
        Added to the variance: ``y = gamma*(x - mean_)/sqrt(var_ + eps) + beta``.
    momentum : None or float in (0, 1], default None
        None: exact statistics of all data seen (Chan merge of batch moments).
        A float: exponential moving average of the batch statistics, like a
        batch-norm layer's running statistics (initial mean 0, variance 1).
        ``partial_fit`` keeps the mode of the statistics it continues: switching
        between None and a float after fitting raises (call ``fit`` to restart).
    gamma, beta : float or array of shape (n_features,), default 1.0 and 0.0
        Scale and shift applied after normalising.
    copy : bool, default True (a bool or NumPy bool, else ``TypeError``)
        False: ``transform`` and ``inverse_transform`` write their result into ``X``
        and return it when ``X`` is a writeable float32/float64 NumPy array
        (otherwise a new array is returned, as with ``copy=True``). ``X`` is never
        modified when ``copy=True``.

    Attributes
    ----------
    mean_, var_ : ndarray of shape (n_features,), float64
        The statistics ``transform`` uses. ``var_`` is the biased variance (m2/n) for
        ``momentum=None``, the moving average of unbiased batch variances otherwise.
    n_samples_seen_ : int or float
        Samples seen since the last ``fit``: all of them are in the statistics. A
        float, the sum of the weights seen, once a ``sample_weight`` was given (an
        unweighted batch counts 1 per sample), as in StandardScaler.
    n_features_in_, feature_names_in_ : as in scikit-learn.

    Input of dtype float32 gives float32 output (float64 for any other dtype);
    NaN, infinity and sparse input are rejected. A call that raises (bad input or
    parameters) leaves the fitted state as it was.
    """

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = None,
        gamma: ArrayLike = 1.0,
        beta: ArrayLike = 0.0,
        copy: bool = True,
    ) -> None:
        self.eps = eps
        self.momentum = momentum
        self.gamma = gamma
        self.beta = beta
        self.copy = copy

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------------ parameters
    def _check_params(self, n_features: int) -> tuple[Any, ...]:
        """Validated (eps, momentum, gamma, beta); gamma and beta as float64 (n_features,)."""
        name = type(self).__name__
        eps, momentum = self.eps, self.momentum
        if not _is_real(eps) or not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
        if momentum is not None and (not _is_real(momentum) or not 0 < momentum <= 1):
            raise ValueError(
                f"{name}: momentum must be None (exact statistics) or a number in (0, 1], got {momentum!r}"
            )
        check_bool(name, "copy", self.copy)
        affine = [self._check_affine(name, p, getattr(self, p), n_features) for p in ("gamma", "beta")]
        return float(eps), momentum if momentum is None else float(momentum), *affine

    @staticmethod
    def _check_affine(name: str, param: Any, value: Any, n_features: int) -> NDArray[np.float64]:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except OverflowError:  # an int beyond float64
            raise ValueError(f"{name}: {param} must be finite, got {value!r}"[:200]) from None
        except (TypeError, ValueError):
            raise TypeError(
                f"{name}: {param} must be a number or an array of n_features={n_features} numbers, "
                f"got {type(value).__name__} {value!r}"[:200]
            ) from None
        if arr.ndim == 0:
            arr = np.full(n_features, float(arr))
        elif arr.shape != (n_features,):
            raise ValueError(
                f"{name}: {param} must be a scalar or have shape ({n_features},) (one value per "
                f"feature), got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: {param} must be finite, got {value!r}"[:200])
        return arr

    # ------------------------------------------------------------ fitting
    def _validate_fit(self, X: Any, sample_weight: Any) -> tuple[Any, tuple[Any, ...], Summary]:
        """validate_data for fitting, plus the parameters and the weights. On the first
        batch, validate_data(reset=True) sets n_features_in_ (and feature_names_in_)
        before it checks X: they are removed again if anything is rejected.

        Returns (X, params, the batch's summary (n, mean, m2)): n the number of samples,
        or their weight sum with ``sample_weight``. An array kind registered with
        :func:`register_array_kind` validates and reduces X itself (a Dask array comes
        back as a batch with ``shape`` and its chunk moments merged in a tree)."""
        name = type(self).__name__
        first = not hasattr(self, "n_samples_seen_")
        try:
            kind = _array_kind(X)
            weights = None
            if kind is not None:  # reduced while validated: the summary comes back with it
                X = kind.fit_batch(self, X, reset=first, sample_weight=sample_weight)
                n = X.summary[0]
            else:
                X = validate_data(
                    self, X, reset=first, dtype=FLOAT_DTYPES, copy=False, accept_sparse=False, ensure_all_finite=True
                )
                weights = check_sample_weight(name, sample_weight, X.shape[0])
                n = X.shape[0] if weights is None else float(weights.sum())
            params = self._check_params(X.shape[1])
            if not first and (params[1] is None) != ("_moments" in self.__dict__):
                raise ValueError(self._mode_change_message(params[1]))
            if params[1] is not None and not n > 1:
                got = f"{n} sample" if sample_weight is None else f"weights summing to {n!r}"
                raise ValueError(
                    f"{name} with momentum={params[1]} needs at least 2 samples per batch (with sample_weight: "
                    f"weights summing to more than 1) for the unbiased batch variance var*n/(n-1), got {got}"
                )
        except Exception:
            if first:
                for k in _NAME_ATTRS:
                    self.__dict__.pop(k, None)
            raise
        if kind is not None:
            return X, params, X.summary
        if weights is not None:
            return X, params, weighted_moments(X, weights, max(1, _INPLACE_VALUES // X.shape[1]))
        batch = moments(X, axis=1)
        return X, params, (batch.count, batch.mean, batch.m2)

    def _mode_change_message(self, momentum: float | None) -> str:
        name = type(self).__name__
        if momentum is None:
            now, then = "None (exact statistics)", "a moving average (fitted with a float momentum)"
        else:
            now, then = f"{momentum!r} (a moving average)", "exact (fitted with momentum=None)"
        return (
            f"{name}: momentum is {now}, but the statistics partial_fit would continue are {then}; "
            "partial_fit cannot mix the two. Set momentum back, or call fit to start new statistics."
        )

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> Self:
        """Forget previous statistics, then :meth:`partial_fit` ``X`` (with
        ``sample_weight``). Returns self.

        ``y`` is ignored. On an error the previous fit is kept.
        """
        saved = dict(self.__dict__)
        for k in ("n_samples_seen_", "mean_", "var_", "_moments", *_NAME_ATTRS):
            self.__dict__.pop(k, None)
        try:
            return self.partial_fit(X, sample_weight=sample_weight)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)  # same objects, same order: exactly as before
            raise

    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> Self:
        """Update the statistics with one batch ``X`` (n_samples, n_features). Returns self.

        ``momentum=None``: exact merge of the batch's moments into those seen so far.
        Otherwise one moving-average step (see the module docstring). ``y`` is ignored.
        ``sample_weight`` (None, a number, or one finite weight >= 0 per sample, not all
        0) weighs the batch's statistics, weight k counting a sample k times (see the
        module docstring). Raises ``ValueError`` if ``momentum`` switched between None
        and a float since the statistics were started (see the module docstring).
        """
        saved = dict(self.__dict__)
        try:
            X, (eps, momentum, gamma, beta), batch = self._validate_fit(X, sample_weight)
            n, batch_mean, batch_m2 = batch
            new = {"n_samples_seen_": getattr(self, "n_samples_seen_", 0) + n}
            if momentum is None:
                seen = self.__dict__.get("_moments")
                if isinstance(seen, Moments):  # pickled before sample_weight: a Moments, not (n, mean, m2)
                    seen = (seen.count, seen.mean, seen.m2)
                total = batch if seen is None else merge_summaries(seen, batch)
                new.update(_moments=total, mean_=total[1], var_=total[2] / total[0])
            else:
                mean = getattr(self, "mean_", np.zeros(X.shape[1]))
                var = getattr(self, "var_", np.ones(X.shape[1]))
                keep = 1.0 - momentum
                new.update(
                    mean_=keep * mean + momentum * batch_mean,
                    var_=keep * var + momentum * (batch_m2 / n) * (n / (n - 1.0)),
                )
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)  # validate_data may have set n_features_in_
            raise
        self.__dict__.update(new)  # computed in full first: nothing below can fail
        return self

    # ------------------------------------------------------------ transforming
    def transform(self, X: Any, copy: bool | None = None) -> Any:
        """``y = gamma*(X - mean_)/sqrt(var_ + eps) + beta``, by the eval-mode Numba kernel.

        ``copy`` overrides the constructor's ``copy`` for this call.
        """
        check_is_fitted(self)
        copy = check_bool(type(self).__name__, "copy", self.copy if copy is None else copy)
        kind = _array_kind(X)
        if kind is not None:
            X = kind.check_array(self, X, reset=False)
        else:
            X = validate_data(
                self, X, reset=False, dtype=FLOAT_DTYPES, copy=False, accept_sparse=False, ensure_all_finite=True
            )
        eps, _, gamma, beta = self._check_params(X.shape[1])
        dt = X.dtype
        # The float64 statistics go to the kernel as they are (eval mode accepts them for
        # float32 input and folds them into float64 coefficients): rounding mean_ to
        # float32 first would cost up to half a float32 ulp of |mean_| in every output.
        args = dict(
            gamma=gamma.astype(dt),
            beta=beta.astype(dt),
            training=False,
            eps=eps,
            running_mean=self.mean_,
            running_var=self.var_,
        )
        if kind is not None:  # lazy: e.g. a Dask array of the same chunks
            return kind.transform(X, **args)
        if copy or not X.flags.writeable:
            return batch_norm_forward(X, **args)[0]
        rows = max(1, _INPLACE_VALUES // X.shape[1])
        buf = np.empty((min(rows, X.shape[0]), X.shape[1]), dt)
        for r0 in range(0, X.shape[0], rows):
            block = X[r0 : r0 + rows]
            X[r0 : r0 + rows] = batch_norm_forward(block, out=buf[: block.shape[0]], **args)[0]
        return X

    def inverse_transform(self, X: Any, copy: bool | None = None) -> Any:
        """``x = (X - beta)*sqrt(var_ + eps)/gamma + mean_`` (undoes :meth:`transform`).

        Needs every gamma != 0. ``copy`` overrides the constructor's ``copy``.
        """
        check_is_fitted(self)
        copy = check_bool(type(self).__name__, "copy", self.copy if copy is None else copy)
        kind = _array_kind(X)
        if kind is not None:
            X = kind.check_array(self, X, reset=False)
        else:
            X = check_array(
                X,
                dtype=FLOAT_DTYPES,
                copy=copy,
                accept_sparse=False,
                ensure_all_finite=True,
                input_name="X",
                estimator=self,
            )
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
        eps, _, gamma, beta = self._check_params(X.shape[1])
        if np.any(gamma == 0):
            raise ValueError(
                f"{type(self).__name__}.inverse_transform needs gamma != 0 for every feature "
                f"(zero at features {np.flatnonzero(gamma == 0).tolist()})"
            )
        scale = np.sqrt(self.var_ + eps) / gamma
        shift = self.mean_ - beta * scale
        if kind is not None:  # lazy, like transform
            return kind.inverse_transform(X, scale.astype(X.dtype), shift.astype(X.dtype))
        if not X.flags.writeable:
            X = X.copy()
        X *= scale.astype(X.dtype)
        X += shift.astype(X.dtype)
        return X


# ---------------------------------------------------------------- other array kinds
# Array kinds that are not NumPy-compatible register how the transformer handles them:
# (is_kind(X) -> bool, support), support having fit_batch(estimator, X, reset) -> a
# batch with ``shape`` and ``moments``, check_array(estimator, X, reset) -> X,
# transform(X, gamma, beta, running_mean, running_var, eps, training) -> Y and
# inverse_transform(X, scale, shift) -> X*scale + shift (per feature). The support
# module of a library registers itself when imported; the transformer imports it only
# once that library is loaded (no array of its kind can exist before), so a Dask array
# takes the Dask path with no extra import by the user, and NumPy-only users never
# load Dask support.
_ARRAY_KINDS: list[tuple[Callable[[Any], bool], Any]] = []
_SUPPORT_MODULES = {"dask.array": "numbabn.distributed.dask"}  # library module -> support module


def register_array_kind(is_kind: Callable[[Any], bool], support: Any) -> None:
    """Route arrays for which ``is_kind(X)`` is true to ``support`` (see above)."""
    if (is_kind, support) not in _ARRAY_KINDS:
        _ARRAY_KINDS.append((is_kind, support))


def _array_kind(X: Any) -> Any:
    """The registered support for X's kind, or None for anything NumPy-compatible."""
    for library, module in _SUPPORT_MODULES.items():
        if library in sys.modules and module not in sys.modules:
            importlib.import_module(module)
    return next((support for is_kind, support in _ARRAY_KINDS if is_kind(X)), None)
