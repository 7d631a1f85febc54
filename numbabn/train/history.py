"""What a :class:`~numbabn.train.Trainer` run recorded.

Step t is the t-th optimizer update (0-based, counted over the trainer's life);
everything recorded "at step t" was measured on the parameters θ_t before that
update:

``step, loss, accuracy``
    Per training step: the mini-batch loss L(θ_t; x_t, y_t) of the training forward
    pass, and its accuracy for classification losses (fraction of argmax(logits) ==
    label; for the sigmoid loss, of samples with every output on its target's side of
    0), None otherwise.
``metrics``
    ``{name: {"step": [...], "value": [...]}}``: each metric's value every
    ``record_every`` steps. Values are stored JSON-ready (arrays as nested lists,
    dict keys as strings), so a :meth:`History.to_json` / :meth:`History.from_json` round trip is exact.
``eval``
    ``{"step": [...], "loss": [...], "accuracy": [...]}`` on the held-out data,
    measured in eval mode at step 0, every ``eval_every`` steps and after the last
    step (θ_T is recorded as step T).
``meta``
    Free-form JSON-ready settings of the run (batch size, seed, ...).
"""

import json
import math
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` with NumPy scalars/arrays as Python numbers/lists, tuples as lists and
    dict keys as strings (what JSON stores, so a round trip gives it back unchanged)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"History: cannot store a value of type {type(value).__name__} ({value!r:.80}) as JSON")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Nested dicts/lists -> ``{"prefix.key.0": number}``."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = math.nan if value is None else value


class History:
    """Series recorded by :meth:`numbabn.train.Trainer.fit` (see the module docstring)."""

    def __init__(self, classification: bool = True, meta: dict[str, Any] | None = None) -> None:
        self.step: list[int] = []
        self.loss: list[float] = []
        self.accuracy: list[float] | None = [] if classification else None
        self.metrics: dict[str, Any] = {}
        self.eval: dict[str, list[Any]] = (
            {"step": [], "loss": [], "accuracy": []} if classification else {"step": [], "loss": []}
        )
        self.meta = jsonable(meta or {})

    # ------------------------------------------------------------ recording
    def record_step(self, step: int, loss: float, accuracy: float | None = None) -> None:
        self.step.append(int(step))
        self.loss.append(float(loss))
        if self.accuracy is not None:
            self.accuracy.append(float(accuracy))

    def record_metric(self, name: str, step: int, value: Any) -> None:
        series = self.metrics.setdefault(name, {"step": [], "value": []})
        series["step"].append(int(step))
        series["value"].append(jsonable(value))

    def record_eval(self, step: int, loss: float, accuracy: float | None = None) -> None:
        self.eval["step"].append(int(step))
        self.eval["loss"].append(float(loss))
        if "accuracy" in self.eval:
            self.eval["accuracy"].append(float(accuracy))

    # ------------------------------------------------------------ access
    def metric(self, name: str) -> tuple[list[int], list[Any]]:
        """``(steps, values)`` of one metric."""
        if name not in self.metrics:
            raise KeyError(f"History: no metric {name!r}; recorded: {sorted(self.metrics)}")
        series = self.metrics[name]
        return series["step"], series["value"]

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "metrics": self.metrics,
            "eval": self.eval,
            "meta": self.meta,
        }

    def to_json(self, **dumps_kwargs: Any) -> str:
        """The history as a JSON string (non-finite floats written as NaN/Infinity)."""
        return json.dumps(self.to_dict(), **dumps_kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "History":
        keys = {"step", "loss", "accuracy", "metrics", "eval", "meta"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ValueError(
                f"History.from_dict: expected a dict with keys {sorted(keys)}, "
                f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}"
            )
        history = cls(classification=data["accuracy"] is not None, meta=data["meta"])
        history.step, history.loss, history.accuracy = data["step"], data["loss"], data["accuracy"]
        history.metrics, history.eval = data["metrics"], data["eval"]
        return history

    @classmethod
    def from_json(cls, text: str) -> "History":
        """The :class:`History` that :meth:`to_json` wrote."""
        return cls.from_dict(json.loads(text))

    def to_frame(self) -> Any:
        """One pandas DataFrame indexed by step: ``loss``, ``accuracy``, ``eval_loss``,
        ``eval_accuracy`` and every metric flattened to ``name.key.index`` columns (NaN
        where a column was not recorded at that step). Needs pandas."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "History.to_frame needs pandas (pip install pandas); History.to_dict() gives the same data without it"
            ) from exc
        frame = pd.DataFrame({"loss": self.loss}, index=pd.Index(self.step, name="step"))
        if self.accuracy is not None:
            frame["accuracy"] = self.accuracy
        columns = {f"eval_{k}": pd.Series(v, index=self.eval["step"]) for k, v in self.eval.items() if k != "step"}
        for name, series in self.metrics.items():
            rows = []
            for value in series["value"]:
                flat: dict[str, Any] = {}
                _flatten(name, value, flat)
                rows.append(flat)
            part = pd.DataFrame(rows, index=series["step"])
            columns.update({col: part[col] for col in part.columns})
        if columns:
            frame = frame.join(pd.DataFrame(columns), how="outer")
        frame.index.name = "step"
        return frame

    def __repr__(self) -> str:
        return f"History({len(self.step)} steps, metrics={sorted(self.metrics)}, {len(self.eval['step'])} evaluations)"
