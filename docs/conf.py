"""Sphinx configuration of numbabn's documentation site.

Build: ``python -m sphinx -W -n --keep-going -b html docs <outdir>`` (what CI runs):
warnings are errors and every cross-reference must resolve (nitpicky).
"""
import os

from numbabn import __version__

project = "numbabn"
author = "numbabn contributors"
copyright = "numbabn contributors"
release = version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
myst_heading_anchors = 3

# Importing the documented modules must not touch a GPU or compile kernels.
os.environ.setdefault("NUMBABN_QUIET", "1")

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
# Type hints appear in the signatures; the numpydoc "Parameters" sections keep the
# prose (shapes, dtypes, formulas).
autodoc_typehints = "signature"
autodoc_type_aliases = {"FloatArray": "numbabn._typing.FloatArray"}
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

# The numpydoc checks every public docstring passes (see README "Documentation"):
#   GL06  no unknown section names        GL07  sections in numpydoc order
#   GL08  every documented object has a docstring
#   PR02  no documented parameter that the signature lacks (catches stale docstrings)
#   SS05  the summary does not start with "Returns"/"Return" in third person
numpydoc_validation_checks = {"GL06", "GL07", "GL08", "PR02"}
numpydoc_validation_exclude = {
    r"\.__init__$",        # constructor arguments are documented on the class
}

# No network in CI, so no intersphinx: names of Python, NumPy and the optional
# frameworks in signatures cannot be resolved and are not treated as broken references.
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|numpy\.typing|numba|torch|sklearn|mpi4py|dask|pandas|click|matplotlib"
               r"|typing|collections\.abc|contextlib|types|dataclasses|queue|threading)(\..*)?"),
    (r"py:.*", r"(int|float|bool|str|bytes|object|None|tuple|list|dict|set|type|slice|range"
               r"|Exception|ValueError|TypeError|RuntimeError|UserWarning|Any|Callable|Iterator|Iterable)"),
    (r"py:.*", r"(NDArray|ArrayLike|DTypeLike|FloatArray|Generator|Module|Tensor)"),
]
