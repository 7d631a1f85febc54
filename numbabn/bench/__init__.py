"""numbabn's benchmarks, inside the package so that ``numbabn bench`` works from a
regular (non-editable) install.

- :mod:`.cases`: shapes, suites, op and part names; imports nothing heavy, so the CLI
  reads its choices from here at ``--help`` time.
- :mod:`.harness`: one timing harness for the kernels, with a backend strategy
  (numbabn on the CPU, numbabn on CUDA in :mod:`.cuda`, PyTorch and the NumPy
  reference as comparisons).
- :mod:`.report`: the text table, JSON, CSV and plot of a harness report, and the
  table formatter the other benchmarks share.
- :mod:`.sklearn_estimators`, :mod:`.torch_modules`: the scikit-learn estimators and
  :mod:`numbabn.torch`'s modules against their libraries' own.

The top-level ``bench/`` folder holds the pytest-benchmark suite and scripts, built on
the public names here.
"""
