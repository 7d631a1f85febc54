"""numbabn.train.experiments: every registered experiment runs a few steps over a
sweep, writes its JSON of raw series and its PNG figures, and rejects bad arguments.
(The documented outcomes are rerun by tests/test_train_regression.py, marked slow.)"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from numbabn.cli import main
from numbabn.train import experiments
from numbabn.train.experiments import EXPERIMENTS

STEPS = 4

# experiment -> (networks, metrics recorded per run, check of one landscape/ics record)
EXPECTED = {
    "ioffe": (["standard", "bn"], {"percentiles", "population_test_accuracy"}),
    "landscape": (["standard", "bn"], {"landscape", "hessian"}),
    "vgg": (["standard", "bn"], {"landscape", "hessian"}),
    "ics": (["standard", "bn", "noisy"], {"ics"}),
    "noisy": (["standard", "bn", "noisy"], {"percentiles"}),
    "lp": (["standard", "bn", "l1", "l2", "linf"], {"landscape"}),
    "dln": (["standard", "bn"], {"landscape", "hessian", "ics"}),
    "maxlr": ([], set()),
}


@pytest.fixture(autouse=True)
def short_searches(monkeypatch):
    """The learning-rate searches run 30-step trials here (100 in the experiments):
    long enough for a classifier at lr 0.1 to halve its loss, the success criterion."""
    monkeypatch.setattr(experiments, "SEARCH_STEPS", 30)


def test_registry_matches():
    assert set(EXPERIMENTS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_writes_json_and_figures(name, tmp_path):
    kwargs = {"depth": 3} if name in ("landscape", "vgg", "dln") else {}
    kwargs.update({"lr": 0.05} if name == "dln" else {})
    summary = EXPERIMENTS[name](steps=STEPS, seeds=[1], out=tmp_path, progress=False, **kwargs)
    json.dumps(summary)  # the CLI prints it as JSON
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert summary["json"] == str(tmp_path / f"{name}.json")
    config = data["config"]
    assert data["experiment"] == name and config["steps"] == STEPS and config["seeds"] == [1]
    nets, metrics = EXPECTED[name]
    lrs = config["lr"] if nets else []
    assert list(data["runs"]) == [experiments.key(lr, 1, net) for lr in lrs for net in nets]
    lr = lrs[0] if lrs else None
    for run in data["runs"].values():
        assert run["step"] == list(range(STEPS)) and len(run["loss"]) == STEPS
        assert set(run["metrics"]) == metrics
        for metric in metrics:
            # steps // 40 < 1: every step (ioffe's population accuracy after the last one too)
            last = [STEPS] if metric == "population_test_accuracy" else []
            assert run["metrics"][metric]["step"] == [*range(STEPS), *last]
        if name != "dln":
            assert run["eval"]["step"][0] == 0 and run["eval"]["step"][-1] == STEPS
    if "landscape" in metrics and name != "lp":
        # probe range the paper's way: the top η is the standard net's stable edge, recorded with its rule
        top = config["eta_top"]
        assert top > 0 and "largest stable learning rate" in config["eta_rule"]
        assert any(t["lr"] == top and t["trained"] for t in config["eta_search"])
        assert config["standard_fails_at"] is None or config["standard_fails_at"] > top
        etas = data["runs"][experiments.key(lr, 1, "bn")]["metrics"]["landscape"]["value"][0]["etas"]
        assert etas[-1] == pytest.approx(top) and etas[0] == pytest.approx(top / (3000 if name == "dln" else 8))
        assert summary[f"lr={lr:g}"]["measures"]["beta_smoothness"]["all"]["seeds"]["n"] == 1
        # the edge: λ_max (largest algebraic eigenvalue) per probe, ‖H‖₂ = |λ| beside it
        for net in ("standard", "bn"):
            records = data["runs"][experiments.key(lr, 1, net)]["metrics"]["hessian"]["value"]
            for r in records:
                assert r["max_eigenvalue"] <= abs(r["eigenvalue"]) * (1 + 1e-9)
                assert (r["max_eigenvalue"] == r["eigenvalue"]) == (r["eigenvalue"] >= 0) == (r["max_iterations"] == 0)
            edge = summary[f"lr={lr:g}"]["edge"][net]
            assert edge["probes"] == len(records) and edge["negative_top"] == sum(r["eigenvalue"] < 0 for r in records)
            assert edge["lambda_max_lr_over_2"]["median"] <= edge["hessian_lr_over_2"]["median"] * (1 + 1e-9)
    if name == "lp":
        assert "[½, 4]·lr" in config["eta_rule"] and config["eta_range"] == {f"lr={lr:g}": [lr / 2, 4 * lr]}
    if name == "maxlr":
        # BN's search starts at the standard net's edge on the same seed (the start lr if there is none)
        for arch in ("mlp3", "mlp8", "vgg4", "dln25"):
            std, bn = (config["searches"][f"{arch}/seed=1/{net}"] for net in ("standard", "bn"))
            assert bn["trials"][0]["lr"] == (std["stable_lr"] or config["start_lr"])
            assert std["trials"][0]["lr"] == config["start_lr"]
    pngs = sorted(tmp_path.glob("*.png"))
    assert [str(p) for p in pngs] == sorted(summary["figures"]) and pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000


def test_sweep_over_rates_and_seeds(tmp_path):
    summary = EXPERIMENTS["ics"](steps=2, seeds=2, lr=(0.05, 0.1), out=tmp_path, progress=False)
    assert set(summary) >= {"lr=0.05", "lr=0.1"}
    for lr in ("lr=0.05", "lr=0.1"):
        entry = summary[lr]["layer1"]
        assert entry["bn_vs_standard_l2"]["seeds"]["n"] == 2
        assert entry["bn_vs_standard_l2"]["probes"]["n"] == 4  # 2 seeds × 2 probes
        assert entry["bn"]["l2"]["n"] == 4 and entry["bn"]["l2"]["q25"] <= entry["bn"]["l2"]["median"]
    data = json.loads((tmp_path / "ics.json").read_text())
    assert len(data["runs"]) == 2 * 2 * 3 and "lr=0.1/seed=1/noisy" in data["runs"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["ics_fig3_lr0.05.png", "ics_fig3_lr0.1.png"]


def test_the_order_of_the_rates_changes_nothing():
    """The η search started at 4x the first rate listed: ``--lr 0.1 --lr 0.15`` and
    ``--lr 0.15 --lr 0.1`` found different tops (2.075, 2.201), and so different η and
    different numbers for the same (lr, seed). It starts at 4x the smallest."""
    kw = dict(steps=4, seeds=1, depth=1, progress=False)
    up = EXPERIMENTS["landscape"](lr=(0.1, 0.15), **kw)
    down = EXPERIMENTS["landscape"](lr=(0.15, 0.1), **kw)
    assert up["eta_top"] == down["eta_top"] and up["lr=0.1"] == down["lr=0.1"]


def test_no_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = EXPERIMENTS["ics"](steps=2, seeds=1, progress=False)
    assert "json" not in summary and "figures" not in summary and not list(tmp_path.iterdir())
    # The same run written out: the summary is the median of the recorded per-probe
    # ‖G − G′‖₂ of layer 1 (seed 0, probes at steps 0 and 1), positive under BN.
    written = EXPERIMENTS["ics"](steps=2, seeds=1, progress=False, out=tmp_path)
    assert {k: v for k, v in written.items() if k not in ("json", "figures", "seconds")} == {
        k: v for k, v in summary.items() if k != "seconds"
    }
    run = json.loads((tmp_path / "ics.json").read_text())["runs"]["lr=0.1/seed=0/bn"]
    l2 = [probe["1"]["l2"] for probe in run["metrics"]["ics"]["value"]]
    assert len(l2) == 2 and min(l2) > 0
    assert summary["lr=0.1"]["layer1"]["bn"]["l2"]["median"] == pytest.approx(float(np.median(l2)), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"lr": ()},
        {"lr": (0.1, "x")},
        {"seeds": 0},
        {"seeds": [1, 1]},
        {"seeds": []},
        {"seeds": 1.5},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="experiment ics"):
        EXPERIMENTS["ics"](progress=False, **kwargs)


def test_bad_depth():
    with pytest.raises(ValueError, match="experiment dln: depth"):
        EXPERIMENTS["dln"](depth=1, progress=False)
    with pytest.raises(TypeError):
        EXPERIMENTS["ics"](depth=3, progress=False)  # no depth: the MLP of the paper's figure


def test_cli_runs_an_experiment(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "experiment",
            "dln",
            "--steps",
            "2",
            "--seed",
            "3",
            "--lr",
            "0.02",
            "--lr",
            "0.04",
            "--depth",
            "4",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["lr=0.02"]["two_over_lr"] == pytest.approx(100.0)
    assert summary["lr=0.04"]["lr_on_sum_of_squares"] == pytest.approx(4e-6)
    assert (tmp_path / "o" / "dln_fig10_lr0.02.png").exists() and (tmp_path / "o" / "dln_ics_fig3_lr0.04.png").exists()
    config = json.loads((tmp_path / "o" / "dln.json").read_text())["config"]
    assert config["lr"] == [0.02, 0.04] and config["seeds"] == [3] and config["steps"] == 2 and config["depth"] == 4
    assert config["ics_layers"] == [3]  # depth 4 has no layer 8 or 16: the last one


def test_cli_json_names_the_published_figures_and_repeats_byte_for_byte(tmp_path):
    """``--out`` writes in a staging directory first: the JSON names each figure by its
    path relative to DIR, which holds after the move, so two runs of the same command
    write the same bytes."""
    files = []
    for out in (tmp_path / "first", tmp_path / "second"):
        command = ["experiment", "ics", "--steps", "2", "--seed", "0", "--out", str(out), "--json"]
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        printed = json.loads(result.output)["figures"]
        figures = json.loads((out / "ics.json").read_text())["summary"]["figures"]
        assert figures == ["ics_fig3.png"] and printed == [str(out / "ics_fig3.png")]
        assert all((out / figure).is_file() for figure in figures)
        files.append((out / "ics.json").read_bytes())
    assert files[0] == files[1]


def test_cli_options():
    runner = CliRunner()
    both = runner.invoke(main, ["experiment", "ics", "--seeds", "2", "--seed", "1"])
    assert both.exit_code != 0 and "not both" in both.output
    assert "--depth" not in runner.invoke(main, ["experiment", "ics", "--help"]).output
    assert "--depth" in runner.invoke(main, ["experiment", "landscape", "--help"]).output


def test_cli_reports_what_the_experiment_rejects_as_an_option_error(tmp_path):
    """The experiment's own checks (dln needs depth >= 2) come out as click's one line
    naming the option, exit 2, before any work: --out is not created."""
    result = CliRunner().invoke(main, ["experiment", "dln", "--depth", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output == "Error: Invalid value for '--depth': depth must be an int >= 2, got 1\n"
    assert not list(tmp_path.iterdir())


def test_rates_that_print_alike_are_refused_before_any_work(tmp_path):
    """The results of a rate are keyed f"lr={lr:g}" (summary, runs, figure names): two
    rates alike in 6 significant digits would overwrite each other, so they are an
    option error, and --out is not created."""
    with pytest.raises(ValueError, match=r"experiment ics: lr must differ .* got 0\.1 and 0\.1000001"):
        EXPERIMENTS["ics"](steps=1, seeds=[0], lr=(0.1, 0.1000001), progress=False)
    result = CliRunner().invoke(
        main,
        [
            "experiment",
            "ics",
            "--steps",
            "1",
            "--seed",
            "0",
            "--lr",
            "0.1",
            "--lr",
            "0.1000001",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: Invalid value for '--lr': lr must differ in the first 6 significant digits")
    assert not list(tmp_path.iterdir())


def test_population_accuracy_is_ioffe_algorithm_2():
    """Inference statistics = the average of the batch means and of the unbiased batch
    variances of the current network over the training set; the model is left as found."""
    rng = np.random.default_rng(4)
    model = experiments.mlp("bn", 0, widths=(6, 5, 3))
    X, y = rng.standard_normal((130, 6)), rng.integers(0, 3, 130)
    X_te, y_te = rng.standard_normal((400, 6)), rng.integers(0, 3, 400)
    experiments._train(
        model,
        experiments.SoftmaxCrossEntropy(),
        (X, None, y, None),
        steps=7,
        lr=0.5,
        seed=0,
        progress=False,
        label="t",
        batch_size=20,
    )
    state = model.state_dict()
    metric = experiments.PopulationAccuracy(X, X_te, y_te, batch_size=20)
    got = metric(model, None, None, None)
    after = model.state_dict()
    assert all(np.array_equal(after[k], v) for k, v in state.items()) and model[1].momentum == 0.1
    h = [X[s : s + 20] @ model[0].weight.value.T + model[0].bias.value for s in range(0, 101, 20)]  # 6 full batches
    mean = np.mean([b.mean(0) for b in h], axis=0)
    var = np.mean([b.var(0) * 20 / 19 for b in h], axis=0)
    model[1].running_mean[...], model[1].running_var[...] = mean, var
    expected = np.mean(np.argmax(model.eval().forward(X_te), axis=1) == y_te)
    model.train()
    assert got == expected


def test_population_accuracy_without_bn_is_the_plain_test_accuracy():
    """No BN layer: no training-set pass, the eval-mode test accuracy, model untouched."""
    rng = np.random.default_rng(5)
    model = experiments.mlp("standard", 0, widths=(6, 5, 3))
    X, X_te, y_te = rng.standard_normal((130, 6)), rng.standard_normal((400, 6)), rng.integers(0, 3, 400)
    state = model.state_dict()
    got = experiments.PopulationAccuracy(X, X_te, y_te, batch_size=20)(model, None, None, None)
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in state.items()) and model.training
    assert got == np.mean(np.argmax(model.eval().forward(X_te), axis=1) == y_te)


def test_options_presets_and_explicit_values():
    defaults = {
        "default": {"steps": 100, "lr": (0.1,), "depth": 3},
        "full": {"steps": 900, "seeds": 5, "lr": (0.05, 0.1)},
    }
    opts = experiments._options("x", steps=None, seeds=None, lr=None, full=False, defaults=defaults)
    assert opts == (100, [0, 1, 2], (0.1,), 3)
    assert experiments._options("x", steps=None, seeds=None, lr=None, full=True, defaults=defaults) == (
        900,
        [0, 1, 2, 3, 4],
        (0.05, 0.1),
        3,
    )
    # explicit arguments win over the preset; repeated rates count once
    assert experiments._options(
        "x", steps=7, seeds=[4, 2], lr=(0.3, 0.3, 0.2), full=True, depth=5, defaults=defaults
    ) == (7, [4, 2], (0.3, 0.2), 5)


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--lr", "0.1", "--lr", "0.2"],
            "Error: Invalid value for '--lr': lr must be one rate, the start of its search, got 2: (0.1, 0.2)\n",
        ),
        (
            ["--steps", "1"],
            "Error: Invalid value for '--steps': steps must be >= 2: a search run trains when the mean of its last "
            "tenth ends below its first loss, and the last tenth of a 1-step run is that loss; got 1\n",
        ),
    ],
)
def test_maxlr_refuses_what_it_cannot_use_before_any_work(tmp_path, monkeypatch, args, expected):
    """maxlr searches from one rate (a second --lr was silently ignored), and a 1-step
    search run can never count as training (every edge came out 'no finite value')."""
    monkeypatch.setattr(experiments, "_train", lambda *a, **k: pytest.fail("a network trained"))
    result = CliRunner().invoke(main, ["experiment", "maxlr", "--seeds", "1", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output == expected, result.output
    assert not list(tmp_path.iterdir())


def test_maxlr_counts_only_seeds_where_both_networks_have_an_edge(monkeypatch):
    """bn_larger compares the seeds where both searches found a stable rate; the others
    are counted in bn_larger_dropped (a seed where neither had one counted as a BN loss).
    A net that trained at no rate is counted as such, not as "no divergence found"
    (its search found no diverging rate either: it stopped below every rate tried)."""
    edges = {0: (None, None), 1: (None, 0.5), 2: (0.1, 0.2)}  # seed -> (standard, bn) stable_lr

    def edge(name, build, net, loss, data, seed, batch_size, lr0, steps):
        stable = edges[seed][net == "bn"]
        diverged = None if stable is None or (seed, net) == (1, "bn") else 1.0  # bn of seed 1: capped
        return {"stable_lr": stable, "diverged_lr": diverged, "trials": []}

    monkeypatch.setattr(experiments, "_edge", edge)
    summary = EXPERIMENTS["maxlr"](steps=2, seeds=3, progress=False)
    for arch in ("mlp3", "mlp8", "vgg4", "dln25"):
        assert summary[arch]["bn_larger"]["k"] == 1 and summary[arch]["bn_larger"]["n"] == 1
        assert summary[arch]["bn_larger_dropped"] == 2
        assert summary[arch]["ratio_bn_over_standard"]["n"] == 1
        assert summary[arch]["standard"]["trained_at_no_rate"] == 2 and summary[arch]["bn"]["trained_at_no_rate"] == 1
        assert summary[arch]["standard"]["no_divergence_found"] == 0 and summary[arch]["bn"]["no_divergence_found"] == 1


def test_a_search_start_that_stalls_climbs_to_the_edge(monkeypatch):
    """From lr 0.005 the η search starts at 0.02, where the standard 8-layer MLP's
    loss falls but does not halve in the experiment's 100-step runs: too small a rate,
    so the search doubles up to the edge (it halved 24 times and raised a RuntimeError)."""
    monkeypatch.setattr(experiments, "SEARCH_STEPS", 100)  # in 30 steps no rate halves this net's loss
    summary = EXPERIMENTS["landscape"](steps=2, seeds=[0], lr=0.005, progress=False)
    assert summary["eta_top"] > 4 * 0.02


def test_a_search_that_finds_no_rate_is_an_option_error(tmp_path, monkeypatch):
    """A learning-rate search in which no rate trains gives no η range: one line naming
    --lr, exit 2, no traceback, and --out is not created."""
    monkeypatch.setattr(experiments, "_train", lambda *a, **k: SimpleNamespace(loss=[2.3, np.inf]))
    result = CliRunner().invoke(main, ["experiment", "vgg", "--seed", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(
        "Error: Invalid value for '--lr': lr must let the standard network train in 30-step runs near 4 x lr "
        "(the search for the top η): from 0.4, none of 24 rates from 4.77e-08 to 0.4 trained (0 stalled, 24 diverged)"
    ), result.output
    assert not list(tmp_path.iterdir())


def test_a_search_that_stops_early_says_why(tmp_path, monkeypatch):
    """A loss that no rate changes: the search stops after three runs (not 24) and
    the one-line error says why it stopped early."""
    monkeypatch.setattr(experiments, "_train", lambda *a, **k: SimpleNamespace(loss=[2.3] * 30))
    result = CliRunner().invoke(main, ["experiment", "vgg", "--seed", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(
        "Error: Invalid value for '--lr': lr must let the standard network train in 30-step runs near 4 x lr "
        "(the search for the top η): from 0.4, none of 3 rates from 0.2 to 0.8 trained (3 stalled, 0 diverged); "
        "it stopped early: the runs at 0.2, 0.4, 0.8 returned the same losses, so the rate does not change the run"
    ), result.output
    assert not list(tmp_path.iterdir())


def test_ioffe_reports_the_population_accuracy_of_the_final_network(tmp_path):
    """The summary's population accuracy is the final network's, as its test accuracy:
    the series ends after the last step. Without BN the two are the same number (they
    were taken one record interval apart: 0.54 against 0.66 after 300 steps)."""
    steps = 300  # records every 10 steps: the last probe before the end at step 290
    summary = EXPERIMENTS["ioffe"](steps=steps, seeds=[0], out=tmp_path, progress=False)
    standard = summary["lr=0.2"]["standard"]
    assert standard["last_population_test_accuracy"]["median"] == standard["test_accuracy"]["median"]
    run = json.loads((tmp_path / "ioffe.json").read_text())["runs"][experiments.key(0.2, 0, "standard")]
    series = run["metrics"]["population_test_accuracy"]
    assert series["step"][-2:] == [steps - 10, steps]
    # the network still learns here: step 290's value would not have done
    assert series["value"][-2] != series["value"][-1] == standard["test_accuracy"]["median"]


def test_ioffe_population_series_ends_at_the_last_step(tmp_path):
    EXPERIMENTS["ioffe"](steps=STEPS, seeds=[1], out=tmp_path, progress=False)
    runs = json.loads((tmp_path / "ioffe.json").read_text())["runs"]
    for run in runs.values():
        assert run["metrics"]["population_test_accuracy"]["step"] == [*range(STEPS), STEPS]
        assert run["metrics"]["percentiles"]["step"] == list(range(STEPS))  # needs a training batch


def test_steps_to_a_threshold_count_seeds_that_never_got_there():
    """``_speed``: a seed whose run never reached the threshold counts as later than
    every seed that did (the median of 600, 650 and never is 650, not 625: the seeds
    that got there alone), and is still a win for the network that got there."""
    steps = [100, 300, 600, 650]
    first = {("standard", 0): 600, ("standard", 1): 650, ("standard", 2): None}
    first.update({("bn", 0): 100, ("bn", 1): 100, ("bn", 2): 300})
    runs = {
        (0.1, seed, net): (steps, [0.9 if at is not None and s >= at else 0.5 for s in steps])
        for (net, seed), at in first.items()
    }
    out = experiments._speed(runs, 0.1, [0, 1, 2], ("standard", "bn"), 0.85, lambda history: history)
    assert out["standard"] == {"median": 650.0, "q25": 625.0, "q75": np.inf, "n": 3, "not_reached": 1}
    assert out["bn"] == {"median": 100.0, "q25": 100.0, "q75": 200.0, "n": 3, "not_reached": 0}
    assert out["bn_first"]["k"] == 3 and out["bn_first"]["n"] == 3
