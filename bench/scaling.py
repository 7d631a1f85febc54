"""Cost per element as inputs grow: every pass must be linear in the input size.

    python bench/scaling.py [--repeat 5]

Two families that were quadratic before (per-block work proportional to C):
``(2, C, 16)`` NCL batch norm with C growing, and LayerNorm-like ``(1, N, 64)``
(N samples normalised over 64 features, i.e. batch norm with N channels), plus the
channels-last ``(M, 64)`` for contrast. Prints ns per element of forward, eval and
backward; a linear implementation keeps each column flat.
"""

import argparse
import time

import numpy as np

import numbabn


def _median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    families = [
        ("(2, C, 16)", lambda n: (2, n, 16), [25_000, 100_000, 400_000]),
        ("(1, N, 64) layer-norm view", lambda n: (1, n, 64), [1_000, 20_000, 200_000]),
        ("(M, 64) channels last", lambda n: (n, 64), [1_000, 20_000, 200_000]),
    ]
    print(f"{numbabn.get_num_threads()} threads, float32, median of {args.repeat}")
    print(f"{'family':<28}{'size':>10}{'fwd ns/el':>11}{'eval ns/el':>11}{'bwd ns/el':>11}")
    for label, shape_of, sizes in families:
        for n in sizes:
            x = rng.standard_normal(shape_of(n)).astype(np.float32)
            C = x.shape[1]
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            _, ctx = numbabn.batch_norm_forward(x)
            # the lambdas bind this iteration's arrays (they are timed right away)
            ms = [
                _median_ms(
                    lambda x=x, rm=rm, rv=rv: numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv),
                    args.repeat,
                ),
                _median_ms(
                    lambda x=x, rm=rm, rv=rv: numbabn.batch_norm_forward(
                        x, running_mean=rm, running_var=rv, training=False
                    ),
                    args.repeat,
                ),
                _median_ms(lambda x=x, ctx=ctx: numbabn.batch_norm_backward(x, ctx), args.repeat),
            ]
            print(f"{label:<28}{n:>10}" + "".join(f"{m * 1e6 / x.size:11.2f}" for m in ms))


if __name__ == "__main__":
    main()
