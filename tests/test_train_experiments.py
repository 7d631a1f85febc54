"""numbabn.train.experiments: every registered experiment runs a few steps, writes its
JSON of raw series and its PNG figures, and rejects bad arguments."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from numbabn.cli import main
from numbabn.train.experiments import EXPERIMENTS

STEPS = 4

# experiment -> (runs, metric name, check of one recorded value)
EXPECTED = {
    "ioffe": (["standard", "bn"], "percentiles", lambda v: np.shape(v) == (3,)),
    "landscape": (["mlp_standard", "mlp_bn", "cnn_standard", "cnn_bn"], "landscape",
                  lambda v: len(v["etas"]) == len(v["losses"]) == len(v["grad_diffs"]) == 8),
    "ics": (["standard", "bn", "noisy"], "ics",
            lambda v: set(v) == {"1", "3"} and all(set(r) == {"l2", "cosine", "grad_norm"} for r in v.values())),
    "noisy": (["standard", "bn", "noisy"], "percentiles", lambda v: np.shape(v) == (3,)),
    "lp": (["standard", "bn", "l1", "l2", "linf"], "landscape", lambda v: len(v["grad_diffs"]) == 8),
    "dln": (["standard", "bn"], "landscape",
            lambda v: len(v["etas"]) == 10 and np.allclose([v["etas"][0], v["etas"][-1]], [0.01 * 0.01, 30 * 0.01])),
}


def test_registry_matches():
    assert set(EXPERIMENTS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_writes_json_and_figures(name, tmp_path):
    summary = EXPERIMENTS[name](steps=STEPS, seed=1, out=tmp_path, progress=False)
    json.dumps(summary)                                  # the CLI prints it as JSON
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert summary["json"] == str(tmp_path / f"{name}.json")
    assert data["experiment"] == name and data["config"]["steps"] == STEPS and data["config"]["seed"] == 1
    runs, metric, check = EXPECTED[name]
    assert list(data["runs"]) == runs
    for run in data["runs"].values():
        assert run["step"] == list(range(STEPS)) and len(run["loss"]) == STEPS
        assert run["metrics"][metric]["step"] == list(range(STEPS))      # steps // 40 < 1: every step
        assert all(check(v) for v in run["metrics"][metric]["value"])
        if name != "dln":
            assert run["eval"]["step"] == list(range(STEPS + 1)) and len(run["accuracy"]) == STEPS
    pngs = sorted(tmp_path.glob("*.png"))
    assert [str(p) for p in pngs] == sorted(summary["figures"]) and pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000


def test_no_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = EXPERIMENTS["ics"](steps=2, progress=False)
    assert "json" not in summary and "figures" not in summary and not list(tmp_path.iterdir())
    assert summary["layer1"]["bn"]["median_l2"] >= 0


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"steps": 2.5}, {"lr": -1.0}, {"lr": float("nan")}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="experiment ics"):
        EXPERIMENTS["ics"](progress=False, **kwargs)


def test_cli_runs_an_experiment(tmp_path):
    result = CliRunner().invoke(main, ["experiment", "dln", "--steps", "2", "--seed", "3", "--lr", "0.02",
                                       "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["two_over_lr"] == pytest.approx(100.0)
    assert (tmp_path / "o" / "dln_fig9.png").exists()
    config = json.loads((tmp_path / "o" / "dln.json").read_text())["config"]
    assert config["lr"] == 0.02 and config["seed"] == 3 and config["steps"] == 2
