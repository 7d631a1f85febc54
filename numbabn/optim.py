"""Optimizers with PyTorch's update rules, on :class:`~numbabn.layers.Parameter` lists.

``step()`` updates ``Parameter.value`` in place from ``Parameter.grad``; parameters
whose grad is None are skipped (``zero_grad()`` sets every grad to None). State is
per parameter and can be inspected, copied and restored, and ``step(params)`` applies
the real update (momentum / Adam moments and step counts included) to a subset only.
That is what the internal-covariate-shift probe needs (:class:`~numbabn.train.metrics.InternalCovariateShift`)::

    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    opt.step(model[:i].parameters())      # the real update, layers before i only
    ...                                   # recompute the gradient of layer i
    model.load_state_dict(saved_model); opt.load_state_dict(saved_opt)

Updates stay in the parameters' dtype (float32 parameters get float32 state).

``weight_decay`` applies to every managed parameter, or, given ``decayed``, to those
only (a mask, as in optax's ``add_decayed_weights``): L2 on the weights but not on
biases or batch-norm gamma/beta, as scikit-learn's MLP ``alpha``. The mask is part of
the optimizer's structure, like its parameter list, not of its ``state_dict``.
"""

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import _checks as V
from ._typing import FloatArray
from .layers.base import Parameter


def _check_like(fn: str, what: str, whose: str, arr: Any, value: np.ndarray) -> None:
    """``arr`` must be an array of ``value``'s shape and dtype: a TypeError for
    anything else or another dtype (as a wrong dtype is in the layers and the
    functional API), a ValueError for another shape."""
    # np.matrix multiplies as matrices, a masked array skips its masked entries: refused
    plain = isinstance(arr, np.ndarray) and not isinstance(arr, (np.matrix, np.ma.MaskedArray))
    if not plain or arr.dtype != value.dtype or arr.shape != value.shape:
        wrong_type = not plain or arr.dtype != value.dtype
        raise (TypeError if wrong_type else ValueError)(
            f"{fn}: {what} must be a NumPy array of {whose} shape {value.shape} and dtype {value.dtype}, "
            f"got {V.describe(arr)}"
        )


def _real(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    ok = (
        V.is_real(value)
        and (value > low if low_open else value >= low)
        and (high is None or (value < high if high_open else value <= high))
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{fn}: {name} must be a finite number in {lo}{low}, {hi}, got {value!r}")
    return float(value)


class Optimizer:
    """Base: holds the parameter list and per-parameter state; subclasses define
    ``_hyperparameters(...)`` (validation) and ``_update(value, grad, state)``."""

    HYPERPARAMETERS: tuple[str, ...] = ()  # the settings, as attributes (assignable, e.g. for a lr schedule)
    STATE_KEYS: tuple[str, ...] = ()  # the arrays (and counters) one parameter's state may hold

    # Defined by each subclass; declared here for the type checker.
    _hyperparameters: Callable[..., dict[str, Any]]
    _update: Callable[[dict[str, Any], FloatArray, FloatArray, dict[str, Any]], tuple[FloatArray, dict[str, Any]]]

    def __init__(
        self, params: Iterable[Parameter], decayed: Iterable[Parameter] | None = None, **hyperparameters: Any
    ) -> None:
        fn = type(self).__name__
        if not isinstance(params, Iterable):
            raise TypeError(
                f"{fn}: params must be an iterable of Parameters (layer.parameters()), got {V.describe(params)}"
            )
        params = list(params)
        if not params:
            raise ValueError(f"{fn}: params is empty")
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"{fn}: params must be Parameters (layer.parameters()), got {V.describe(p)}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{fn}: params contains the same Parameter more than once")
        self.params = params
        hyper = self._hyperparameters(**hyperparameters)
        # Positions, not ids: they stay valid across pickling and deep copies.
        self.decayed = None if decayed is None else frozenset(self._select(fn, "decayed", decayed))
        self.state: list[dict[str, Any]] = [{} for _ in params]
        self.__dict__.update(hyper)

    def zero_grad(self) -> None:
        """Set every managed parameter's grad to None (it is skipped until set again)."""
        for p in self.params:
            p.grad = None

    def step(self, params: Iterable[Parameter] | None = None) -> None:
        """Apply one update to each parameter with a gradient: all managed ones, or only
        those in ``params`` (a subset of the managed parameters, each at most once).

        All or nothing: every selected parameter, its gradient and its state are
        checked and every update is computed before any value or state is written, so
        a step that raises leaves the parameters and the optimizer as they were.
        """
        fn = f"{type(self).__name__}.step"
        hyper = self._hyperparameters(**self.hyperparameters())  # an assigned lr=-1 is caught here
        indices = self._select(fn, "params", params)
        todo = []
        for i in indices:
            p = self.params[i]
            if p.grad is None:
                continue
            self._check_entry(fn, p, self.state[i])
            todo.append(i)
        plain = hyper if self.decayed is None else {**hyper, "weight_decay": 0.0}
        updates = [
            self._update(
                hyper if self.decayed is None or i in self.decayed else plain,
                self.params[i].value,
                self.params[i].grad,
                self.state[i],
            )
            for i in todo
        ]
        for i, (value, state) in zip(todo, updates, strict=True):  # nothing below can fail
            np.copyto(self.params[i].value, value)
            self.state[i] = state

    def _select(self, fn: str, name: str, params: Iterable[Parameter] | None) -> "range | list[int]":
        """Positions in ``self.params`` of the parameters to update (``name``: the
        argument that gave them, for the errors).

        Parameters are matched by identity against the managed list at call time (no
        stored ``id()`` table: that goes stale after pickling or deep-copying the
        optimizer, and a new object can reuse an old address)."""
        if params is None:
            return range(len(self.params))
        if not isinstance(params, Iterable):
            raise TypeError(
                f"{fn}: {name} must be an iterable of Parameters managed by this optimizer, got {V.describe(params)}"
            )
        position = {id(p): i for i, p in enumerate(self.params)}  # ids of live objects, valid for this call
        indices = []
        for p in params:
            i = position.get(id(p))
            if i is None or self.params[i] is not p:
                raise ValueError(f"{fn}: {name}: {p!r} is not managed by this optimizer")
            indices.append(i)
        if len(set(indices)) != len(indices):
            raise ValueError(f"{fn}: {name} names the same Parameter more than once")
        return indices

    def _check_entry(self, fn: str, p: Parameter, state: dict[str, Any]) -> None:
        value, grad = p.value, p.grad
        if not isinstance(value, np.ndarray) or not value.flags.writeable:
            raise ValueError(
                f"{fn}: the value of {p!r} must be a writeable NumPy array (it is updated in place), "
                f"got {'a read-only array' if isinstance(value, np.ndarray) else V.describe(value)}"
            )
        _check_like(fn, f"the grad of {p!r}", "its value's", grad, value)
        # ``state`` is public and may have been set by hand: the rules load_state_dict
        # applies, so that _update never meets a form it cannot take (a step of -1 gave
        # Python's bare ZeroDivisionError, a missing one a KeyError).
        self._check_state(fn, f"the optimizer state of {p!r}", value, state)

    def _check_state(self, fn: str, label: str, value: np.ndarray, state: Any) -> None:
        """The per-parameter ``state`` of a parameter whose value is ``value`` (``label``
        names it in errors): a dict, empty or with exactly ``STATE_KEYS``, its step an
        int >= 0, its arrays of the value's shape and dtype."""
        if not isinstance(state, dict) or (state and set(state) != set(self.STATE_KEYS)):
            raise ValueError(
                f"{fn}: {label} must be a dict, empty or hold exactly the keys {self.STATE_KEYS}, "
                f"got {tuple(state) if isinstance(state, dict) else V.describe(state)}"
            )
        for key, arr in state.items():
            if key == "step":
                V.check_int(fn, f"{label}: 'step'", arr, 0)
                if arr >= 2**63:  # beta**step: an int beyond float64 raised a bare OverflowError
                    raise ValueError(f"{fn}: {label}: 'step' must be < 2**63, got {arr}")
            else:
                _check_like(fn, f"{label}: {key!r}", "the parameter's", arr, value)

    # ------------------------------------------------------------ state
    def hyperparameters(self) -> dict[str, Any]:
        """The current settings, ``{name: value}`` in ``HYPERPARAMETERS`` order."""
        return {name: getattr(self, name) for name in self.HYPERPARAMETERS}

    def state_dict(self) -> dict[str, Any]:
        """``{"hyperparameters": {...}, "state": [per-parameter dict]}``, deep-copied;
        list position = position in ``params``."""
        return {
            "hyperparameters": self.hyperparameters(),
            "state": [
                {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in s.items()}
                for s in self.state
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (copied). Checked completely first; on error
        nothing changes."""
        fn = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != {"hyperparameters", "state"}:
            raise ValueError(
                f"{fn}: expected a dict with keys 'hyperparameters' and 'state', got {V.describe(state_dict)}"
            )
        hyper = state_dict["hyperparameters"]
        if not isinstance(hyper, dict) or set(hyper) != set(self.HYPERPARAMETERS):
            raise ValueError(
                f"{fn}: hyperparameters must have the keys {list(self.HYPERPARAMETERS)}, got {V.describe(hyper)}"
            )
        hyper = self._hyperparameters(**hyper)
        states = state_dict["state"]
        if not isinstance(states, list) or len(states) != len(self.params):
            raise ValueError(
                f"{fn}: state must be a list with one dict per parameter ({len(self.params)}), got {V.describe(states)}"
            )
        new = []
        for i, (p, s) in enumerate(zip(self.params, states, strict=True)):
            self._check_state(fn, f"state[{i}]", p.value, s)
            new.append({key: int(value) if key == "step" else value.copy() for key, value in s.items()})
        self.__dict__.update(hyper)
        self.state = new

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (PyTorch's ``torch.optim.SGD``,
    dampening 0). Per parameter p with gradient g::

        g <- g + weight_decay * p
        b <- g                      (first step)      b <- momentum*b + g   (later)
        g <- g + momentum*b  if nesterov  else  b     (only when momentum > 0)
        p <- p - lr * g

    State: "momentum_buffer" (b) once a step has run with momentum > 0.
    ``decayed``: the parameters ``weight_decay`` applies to (default: all).
    """

    HYPERPARAMETERS = ("lr", "momentum", "nesterov", "weight_decay")
    STATE_KEYS = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        decayed: Iterable[Parameter] | None = None,
    ) -> None:
        super().__init__(params, decayed, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    def _hyperparameters(self, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> dict[str, Any]:
        fn = type(self).__name__
        out = dict(
            lr=_real(fn, "lr", lr),
            momentum=_real(fn, "momentum", momentum),
            nesterov=V.check_bool(fn, "nesterov", nesterov),
            weight_decay=_real(fn, "weight_decay", weight_decay),
        )
        if out["nesterov"] and out["momentum"] == 0:
            raise ValueError(f"{fn}: nesterov=True needs momentum > 0")
        return out

    def _update(
        self, hyper: dict[str, Any], value: FloatArray, grad: FloatArray, state: dict[str, Any]
    ) -> tuple[FloatArray, dict[str, Any]]:
        """(new value, new state), computed without writing to ``value`` or ``state``."""
        lr, momentum, nesterov, weight_decay = (hyper[k] for k in self.HYPERPARAMETERS)
        if weight_decay:
            grad = grad + weight_decay * value
        # A step without momentum keeps the buffer as it is, as torch.optim.SGD does: a
        # momentum set to 0 for a while and then back on carries on from it.
        new_state = dict(state)
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = grad.copy()
            else:
                buf = buf * momentum
                buf += grad
            new_state["momentum_buffer"] = buf
            grad = grad + momentum * buf if nesterov else buf
        return value - lr * grad, new_state


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) as ``torch.optim.Adam`` (L2 weight decay added to the
    gradient, not decoupled; no amsgrad). Per parameter p, step t = 1, 2, ...::

        g <- g + weight_decay * p
        m <- beta1*m + (1 - beta1)*g          v <- beta2*v + (1 - beta2)*g^2
        p <- p - lr/(1 - beta1^t) * m / (sqrt(v)/sqrt(1 - beta2^t) + eps)

    State: "step" (t, an int), "exp_avg" (m), "exp_avg_sq" (v).
    ``decayed``: the parameters ``weight_decay`` applies to (default: all).
    """

    HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
    STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decayed: Iterable[Parameter] | None = None,
    ) -> None:
        super().__init__(params, decayed, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _hyperparameters(
        self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> dict[str, Any]:
        fn = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
        return dict(
            lr=_real(fn, "lr", lr),
            betas=(_real(fn, "betas[0]", betas[0], high=1.0), _real(fn, "betas[1]", betas[1], high=1.0)),
            eps=_real(fn, "eps", eps, low_open=True),
            weight_decay=_real(fn, "weight_decay", weight_decay),
        )

    def _update(
        self, hyper: dict[str, Any], value: FloatArray, grad: FloatArray, state: dict[str, Any]
    ) -> tuple[FloatArray, dict[str, Any]]:
        """(new value, new state), computed without writing to ``value`` or ``state``."""
        lr, (beta1, beta2), eps, weight_decay = (hyper[k] for k in self.HYPERPARAMETERS)
        if weight_decay:
            grad = grad + weight_decay * value
        if state:
            t, m, v = state["step"] + 1, state["exp_avg"].copy(), state["exp_avg_sq"] * beta2
        else:
            t, m, v = 1, np.zeros_like(value), np.zeros_like(value)
        m += (1 - beta1) * (grad - m)  # = beta1*m + (1-beta1)*g, PyTorch's lerp form
        v += (1 - beta2) * grad * grad
        denom = np.sqrt(v)
        denom /= np.sqrt(1 - beta2**t)
        denom += eps
        return value - (lr / (1 - beta1**t)) * (m / denom), {"step": t, "exp_avg": m, "exp_avg_sq": v}
