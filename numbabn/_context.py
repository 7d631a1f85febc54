"""What a batch-norm forward hands to its backward: :class:`BatchNormContext`.

Its own module so that :mod:`numbabn.functional` (which builds it) and the backends
(which read it) import it from one place, and no backend imports the dispatcher.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._typing import AnyArray


@dataclass(eq=False)
class BatchNormContext:
    """What :func:`~numbabn.functional.batch_norm_backward` needs from the forward pass.

    ``x`` is the canonical view of the input (the compute dtype's, but for float16
    input: its bits as int16, which the kernels widen to float32), kept by reference,
    as are ``gamma`` and ``beta`` when C-contiguous: do not modify the input or the
    parameters in place between forward and backward; ``x`` lives where the
    backend computes (a NumPy array, or a device array for ``backend="cuda"``).
    ``mean``/``invstd`` (float64, shape (C,)) are the statistics the forward used:
    batch (or given ``moments=``) statistics in training mode, running statistics
    in eval mode. ``count`` is the number of values per channel those statistics
    summarise (the global count under ``moments=``). ``coef`` is backend data the
    backward reuses (CPU: the forward's (4, F*C) element coefficients, see
    ``numbabn.kernels.cpu.coefficients``; CUDA: None).
    ``residual`` is the canonical view of the fused residual input (kept by reference
    like ``x``; the backward recomputes the ReLU mask from it), or None.
    ``sources`` (CUDA backend only; empty on the CPU backend, whose ``x`` is already a
    view of the caller's array when it can be): the caller's forward ``x`` (and
    ``residual``) as passed, by reference, no copy. ``x`` above may be a device copy
    of them (NumPy input, float16 input), so the backward checks its ``out`` against
    these too: writing dx into the caller's input is refused as on the CPU backend.
    """

    backend: str
    layout: str
    shape: tuple
    axis: int
    dtype: np.dtype
    x: AnyArray
    mean: AnyArray
    invstd: AnyArray
    gamma: AnyArray
    beta: AnyArray
    has_gamma: bool
    has_beta: bool
    training: bool
    relu: bool
    count: int
    coef: Any = None
    residual: AnyArray | None = None
    sources: tuple = ()

    def __repr__(self) -> str:
        # The arrays (the saved input above all) are left out: a repr is one short line.
        return (
            f"BatchNormContext(backend={self.backend!r}, layout={self.layout!r}, shape={tuple(self.shape)}, "
            f"axis={self.axis}, dtype={np.dtype(self.dtype).name}, channels={self.mean.shape[0]}, "
            f"count={self.count}, training={self.training}, relu={self.relu}, "
            f"residual={'given' if self.residual is not None else 'None'}, "
            f"gamma={'given' if self.has_gamma else 'None'}, beta={'given' if self.has_beta else 'None'})"
        )
