"""Registry: built-ins, discovery through the real entry points, fake third-party
entry points (good, broken, clashing), the decorator, and import laziness."""

import importlib.metadata
import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest
from numbabn_plugins.batch_renorm import BatchRenorm

from numbabn import registry
from numbabn.layers import BatchNorm1d, Layer, Linear

PLUGIN_ENTRY_POINTS = {
    "batch_renorm": "numbabn_plugins.batch_renorm:BatchRenorm",
    "ghost_batch_norm": "numbabn_plugins.ghost_batch_norm:GhostBatchNorm",
    "noisy_batch_norm": "numbabn_plugins.noisy_batch_norm:NoisyBatchNorm",
    "lp_batch_norm": "numbabn_plugins.lp_batch_norm:LpBatchNorm",
    "layer_norm": "numbabn_plugins.per_sample_norm:LayerNorm",
    "group_norm": "numbabn_plugins.per_sample_norm:GroupNorm",
}


def test_builtins_and_real_entry_points():
    layers = registry.available_layers()
    assert list(layers) == sorted(layers)
    assert layers["linear"] == layers["batch_norm2d"] == "builtin"
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    for name, value in PLUGIN_ENTRY_POINTS.items():
        assert installed.get(name) == value, "run `pip install -e .` so the entry points exist"
        assert layers[name].startswith("numbabn ") and layers[name].endswith(f"({value})")
    assert registry.layer_class("batch_renorm") is BatchRenorm
    layer = registry.get_layer("batch_renorm", 4, rmax=2.0)
    assert isinstance(layer, BatchRenorm) and layer.rmax == 2.0 and layer.num_features == 4
    assert isinstance(registry.get_layer("linear", 3, 2), Linear)


def test_unknown_name_lists_what_is_available():
    with pytest.raises(KeyError) as info:
        registry.get_layer("batchnorm_1d")
    message = str(info.value)
    assert message.startswith("numbabn: unknown layer 'batchnorm_1d'; available: ")
    assert "batch_norm1d" in message and "group_norm" in message


@pytest.mark.parametrize("lookup", [registry.layer_class, registry.get_layer])
def test_a_name_that_is_not_a_str_is_a_type_error_naming_it(lookup):
    with pytest.raises(TypeError, match=r"^numbabn: name must be a layer's name \(a str\), got list \['x'\]$"):
        lookup(["x"])


class FakeEntryPoint:
    """What importlib.metadata yields, with a distribution we control; loading is
    delegated to a real EntryPoint so import errors are genuine."""

    def __init__(self, name, value, dist="acme-norms", version="1.2"):
        self.name, self.value = name, value
        self.dist = types.SimpleNamespace(name=dist, version=version)

    def load(self):
        return importlib.metadata.EntryPoint(self.name, self.value, registry.ENTRY_POINT_GROUP).load()


@pytest.fixture
def fresh_registry(monkeypatch):
    """A private copy of the table with discovery not yet run; restored afterwards."""
    registry.available_layers()  # make sure the built-ins are in the copy
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_failed", {}, raising=False)
    return monkeypatch


@pytest.fixture
def acme_module(monkeypatch):
    module = types.ModuleType("acme_norms")

    class AcmeNorm(Layer):
        def forward(self, x):
            return x

    module.AcmeNorm = AcmeNorm
    module.not_a_layer = object()
    monkeypatch.setitem(sys.modules, "acme_norms", module)
    return module


def test_fake_third_party_entry_points(fresh_registry, acme_module):
    calls = []
    fakes = [
        FakeEntryPoint("acme_norm", "acme_norms:AcmeNorm"),
        FakeEntryPoint("broken_norm", "acme_missing_module:Norm", dist="broken-dist", version="0.1"),
        FakeEntryPoint("odd_norm", "acme_norms:not_a_layer"),
        FakeEntryPoint("linear", "acme_norms:AcmeNorm"),
    ]

    def entry_points(**kwargs):
        calls.append(kwargs)
        return fakes if kwargs.get("group") == registry.ENTRY_POINT_GROUP else []

    fresh_registry.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(RuntimeWarning) as record:
        layers = registry.available_layers()
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert any(
        "could not load layer plugin 'broken_norm'" in m and "broken-dist 0.1" in m and "ModuleNotFoundError" in m
        for m in messages
    )
    assert any("skipped layer plugin 'odd_norm'" in m and "not a numbabn Layer subclass" in m for m in messages)
    assert any("skipped layer plugin 'linear'" in m and "already registered" in m for m in messages)

    assert layers["acme_norm"] == "acme-norms 1.2 (acme_norms:AcmeNorm)"
    assert "broken_norm" not in layers and "odd_norm" not in layers
    assert layers["linear"] == "builtin" and registry.layer_class("linear") is Linear
    assert isinstance(registry.get_layer("acme_norm"), acme_module.AcmeNorm)
    registry.get_layer("batch_norm1d", 3)
    assert calls == [{"group": registry.ENTRY_POINT_GROUP}]  # discovered lazily, once


def test_register_layer_decorator(fresh_registry):
    @registry.register_layer("scaled_identity")
    class ScaledIdentity(Layer):
        def forward(self, x):
            return 2 * x

    assert registry.available_layers()["scaled_identity"] == __name__
    assert registry.register_layer("scaled_identity")(ScaledIdentity) is ScaledIdentity  # idempotent
    with pytest.raises(ValueError, match="'batch_norm1d' is already registered to .*BatchNorm1d"):
        registry.register_layer("batch_norm1d")(ScaledIdentity)
    with pytest.raises(TypeError, match="expected a Layer subclass"):
        registry.register_layer("not_a_layer")(dict)
    with pytest.raises(ValueError, match="must be a Python identifier"):
        registry.register_layer("bad name")
    assert registry.layer_class("batch_norm1d") is BatchNorm1d


def test_registering_a_builtin_name_before_any_lookup_raises(monkeypatch):
    # As in a fresh process: nothing discovered yet, the table empty.
    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_discovered", False)

    class MyLinear(Layer):
        pass

    with pytest.raises(ValueError, match="'linear' is already registered to .*Linear"):
        registry.register_layer("linear")(MyLinear)
    assert registry.layer_class("linear") is Linear
    assert registry.available_layers()["linear"] == "builtin"


def test_importing_numbabn_and_the_registry_stays_light():
    code = (
        "import sys, numbabn, numbabn.registry; "
        "heavy = [m for m in ('numba', 'numbabn.layers', 'numbabn_plugins') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_module_that_registers_and_is_an_entry_point_imports_without_warnings():
    """numbabn.distributed.sync_batchnorm registers its layers with @register_layer and
    is also named by the package's own entry points: registering must not load the
    entry points (the module, half imported, would be loaded again: a RuntimeWarning
    per layer, an error under -W error)."""
    code = (
        "from numbabn.distributed import SyncBatchNorm1d; import numbabn.registry as r; "
        "print(r.layer_class('sync_batch_norm1d') is SyncBatchNorm1d, r.available_layers()['sync_batch_norm1d'])"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "builtin"] and done.stderr == ""


def test_a_broken_plugin_never_breaks_lookups(fresh_registry):
    def entry_points(**kwargs):
        return [FakeEntryPoint("exploding", "acme_does_not_exist:X")]

    fresh_registry.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(RuntimeWarning, match="exploding"):
        layer = registry.get_layer("batch_norm1d", 2, dtype=np.float64)
    assert isinstance(layer, BatchNorm1d)


def test_a_warning_raised_as_an_error_leaves_every_good_plugin_registered(fresh_registry, acme_module):
    """Under ``-W error`` the first broken plugin's warning stopped discovery half way,
    for the rest of the process: plugins after it were never registered."""
    fakes = [
        FakeEntryPoint("bad-name", "acme_norms:AcmeNorm", dist="a-first"),
        FakeEntryPoint("acme", "acme_norms:AcmeNorm"),
    ]
    fresh_registry.setattr(importlib.metadata, "entry_points", lambda **kw: fakes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="bad-name"):
            registry.get_layer("batch_norm1d", 2)
        assert isinstance(registry.get_layer("acme"), acme_module.AcmeNorm)  # no second discovery, no warning


def test_a_failed_plugins_name_says_why_it_is_unknown(fresh_registry):
    fresh_registry.setattr(
        importlib.metadata, "entry_points", lambda **kw: [FakeEntryPoint("exploding", "acme_does_not_exist:X")]
    )
    with pytest.warns(RuntimeWarning):
        registry.available_layers()
    with pytest.raises(
        registry.UnknownLayerError, match="'exploding' .*not registered: could not load .*ModuleNotFound"
    ):
        registry.get_layer("exploding")


def test_of_two_plugins_claiming_a_name_the_first_distribution_by_name_wins(fresh_registry, acme_module):
    """Not whichever importlib.metadata lists first (the order of site-packages)."""

    class OtherNorm(acme_module.AcmeNorm):
        pass

    acme_module.OtherNorm = OtherNorm
    zed = FakeEntryPoint("norm_x", "acme_norms:OtherNorm", dist="zed")
    abc = FakeEntryPoint("norm_x", "acme_norms:AcmeNorm", dist="abc")
    for order in ([zed, abc], [abc, zed]):
        fresh_registry.setattr(registry, "_registry", {})
        fresh_registry.setattr(registry, "_discovered", False)
        fresh_registry.setattr(importlib.metadata, "entry_points", lambda order=order, **kw: order)
        with pytest.warns(RuntimeWarning, match="'norm_x' .* from zed 1.2"):
            assert registry.available_layers()["norm_x"].startswith("abc 1.2")


def test_a_plugin_distribution_without_a_name_breaks_nothing(fresh_registry, acme_module):
    """A dist-info folder without METADATA (an interrupted install) has no name: sorting
    it against named ones raised TypeError for every lookup, built-ins included."""
    nameless = FakeEntryPoint("nameless_norm", "acme_norms:AcmeNorm", dist=None)
    fakes = [FakeEntryPoint("acme", "acme_norms:AcmeNorm"), nameless]
    fresh_registry.setattr(importlib.metadata, "entry_points", lambda **kw: fakes)
    assert isinstance(registry.get_layer("batch_norm1d", 2), BatchNorm1d)
    assert isinstance(registry.get_layer("nameless_norm"), acme_module.AcmeNorm)


def test_layers_do_not_import_the_registry():
    """One direction only: the registry reads numbabn.layers.BUILTIN_LAYERS; importing
    the layers leaves the registry unloaded."""
    code = (
        "import sys, numbabn.layers; assert 'numbabn.registry' not in sys.modules, 'registry imported'; "
        "from numbabn import registry; from numbabn.layers import BUILTIN_LAYERS; "
        "assert all(registry.layer_class(n) is c for n, c in BUILTIN_LAYERS.items())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_lookup_from_another_thread_waits_for_discovery(fresh_registry, acme_module):
    """While one thread loads the plugins (slow imports), a lookup from another thread
    waits for the complete table instead of reporting a layer as unknown."""
    loading, release = threading.Event(), threading.Event()

    class SlowEntryPoint(FakeEntryPoint):
        def load(self):
            loading.set()
            release.wait(5)
            return super().load()

    fresh_registry.setattr(
        importlib.metadata, "entry_points", lambda **kwargs: [SlowEntryPoint("acme_norm", "acme_norms:AcmeNorm")]
    )
    found, failed = [], []

    def look_up():
        try:
            found.append(registry.layer_class("acme_norm"))
        except KeyError as exc:
            failed.append(exc)

    discovery = threading.Thread(target=registry.available_layers)
    discovery.start()
    try:
        assert loading.wait(5)
        lookup = threading.Thread(target=look_up)
        lookup.start()
        lookup.join(0.2)
        assert not failed, failed[0]  # answered from a half-built table
        assert lookup.is_alive()  # waiting for the discovery
    finally:
        release.set()
        discovery.join(5)
    lookup.join(5)
    assert found == [acme_module.AcmeNorm]
