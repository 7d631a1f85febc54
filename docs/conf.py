"""Sphinx configuration of numbabn's documentation site.

Build: ``python -m sphinx -W -n --keep-going -b html docs <outdir>`` (what CI runs):
warnings are errors and every cross-reference must resolve (nitpicky).
"""

import importlib
import os
import re

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
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

# The numpydoc checks every documented object passes (README "Documentation and development"):
#   GL06  no unknown section names        GL07  sections in numpydoc order
#   GL08  every documented object has a docstring
#   PR02  no documented parameter that the signature lacks (catches stale docstrings)
numpydoc_validation_checks = {"GL06", "GL07", "GL08", "PR02"}
numpydoc_validation_exclude = {
    r"\.__init__$",  # constructor arguments are documented on the class
    # Overrides of the Layer / torch.nn.Module contract methods: documented once, on
    # numbabn.layers.Layer (forward, backward, train, extra_repr) and by PyTorch.
    r"\.(forward|backward|train|extra_repr)$",
}

# No network in CI, so no intersphinx: names of Python, NumPy and the optional
# frameworks in signatures cannot be resolved and are not treated as broken references.
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(numpy|np|numpy\.typing|numba|torch|sklearn|mpi4py|dask|pandas|click|matplotlib"
        r"|typing|collections\.abc|contextlib|types|dataclasses|queue|threading|os|pathlib)(\..*)?",
    ),
    (
        r"py:.*",
        r"(int|float|bool|str|bytes|object|None|tuple|list|dict|set|type|slice|range"
        r"|Exception|ValueError|TypeError|RuntimeError|UserWarning|Any|Callable|Iterator|Iterable)",
    ),
    (r"py:.*", r"(NDArray|ArrayLike|DTypeLike|FloatArray|Generator|Module|Tensor)"),
    # Private base classes (shown by show-inheritance) are not part of the reference.
    (r"py:class", r"(.*\.)?_[A-Za-z]\w*"),
    # numpy.typing.DTypeLike expanded by autodoc into its members.
    (r"py:class", r".*numpy\._typing\..*"),
]
# References that name objects which are private, undocumented or gone.
nitpick_ignore: list[tuple[str, str]] = []
# Docstrings whose reStructuredText is broken (unindented blocks, "::" with nothing
# after it), shown verbatim until fixed, then removed from this set.
_VERBATIM_PHASE2: set[str] = set()


def _python_object(target, module):
    """The object a dotted reference names, absolute or relative to ``module``; None if
    it does not import."""
    for name in (target, f"{module}.{target}") if module else (target,):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attr in parts[split:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return obj
    return None


def _resolve_reexport(app, env, node, contnode):
    """Resolve a reference to a re-exported name (``numbabn.layers.Linear``,
    ``numbabn.batch_norm_forward``) to the page where the object is documented, its
    defining module (``numbabn.layers.linear.Linear``). A name that does not import
    stays a broken reference, so nitpicky mode still reports it."""
    if node.get("refdomain") != "py":
        return None
    obj = _python_object(node["reftarget"], node.get("py:module"))
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname:
        return None
    real = f"{module}.{qualname}"
    if real == node["reftarget"]:
        return None
    return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"], real, node, contnode)


# scikit-learn adds set_*_request methods (metadata routing) to every estimator; their
# docstrings point into scikit-learn's own documentation.
_SKLEARN_GENERATED = re.compile(r"set_\w+_request$")


def _skip_member(app, what, name, obj, skip, options):
    return True if _SKLEARN_GENERATED.match(name) else None


def _verbatim(app, what, name, obj, options, lines):
    if name in _VERBATIM_PHASE2 and lines:
        lines[:] = ["::", ""] + ["    " + line for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _verbatim, priority=900)  # after numpydoc
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-skip-member", _skip_member)
