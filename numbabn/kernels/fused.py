"""One fused multiply-add for the CPU kernels, the same in every kernel that uses it.

``fma(a, b, c)`` is ``a*b + c`` rounded once (LLVM's ``llvm.fma``; a vector
instruction on x86-64 CPUs with FMA3, all since 2013, and on ARMv8; a libm call
elsewhere). The element helpers compute ``y = a*u + b`` with it, so the forward's
output and the backward's recomputed ReLU mask round alike by construction: a
product left for LLVM to contract or not (fast-math ``contract``) is fused in one
kernel and not in another, depending on its flags and loop shape.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a*b + c with one rounding; all three of one float type."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        t = context.get_value_type(a)
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, b, c), codegen
