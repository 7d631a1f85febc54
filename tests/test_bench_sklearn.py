"""The scikit-learn benchmark (numbabn.bench.sklearn_estimators) and ``numbabn bench sklearn``
on tiny sizes: what the rows hold, never the timings (noise on a shared machine)."""

import json

import pytest
from click.testing import CliRunner

from numbabn.bench.sklearn_estimators import format_table, run_sklearn_bench
from numbabn.cli import main


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_run_sklearn_bench_rows():
    rows = run_sklearn_bench(n_samples=500, n_features=3, repeat=1, epochs=2, seeds=(0,), threads=1)
    transformer = [r for r in rows if r["bench"] == "transformer"]
    mlp = [r for r in rows if r["bench"] == "mlp"]
    assert [r["dtype"] for r in transformer] == ["float32", "float64"]
    for r in transformer:
        assert r["out_dtype"] == r["dtype"] and r["threads"] == 1
        assert r["numbabn_ms"] > 0 and r["sklearn_ms"] > 0
        assert r["speedup"] == pytest.approx(r["sklearn_ms"] / r["numbabn_ms"])
        assert r["max_abs_diff"] < (1e-3 if r["dtype"] == "float32" else 1e-9)  # same normalisation
    assert [r["estimator"] for r in mlp] == ["BNMLPClassifier", "MLPClassifier"]
    for r in mlp:
        assert r["epochs"] == 2 and 0 <= r["test_accuracy"] <= r["best_accuracy"] <= 1
        assert r["epochs_to_target"] in (None, 1, 2)
    table = format_table(rows)
    assert "StandardScaler" in table and "MLPClassifier on digits" in table


def test_default_threads_are_the_int_used_and_missing_values_print_as_dash():
    # threads was the string "default" without --threads; an MLP that never reached
    # the target printed "None" under epochs_to_target
    import numbabn

    rows = run_sklearn_bench(["mlp"], epochs=1, seeds=(0,), hidden=(4,), target=1.01)
    assert all(r["threads"] == numbabn.get_num_threads() and type(r["threads"]) is int for r in rows)
    assert all(r["epochs_to_target"] is None for r in rows)
    table = format_table(rows)
    assert "None" not in table
    assert all(line.split()[-1] == "-" for line in table.splitlines()[2:])  # epochs_to_target: the last column


def test_unknown_part():
    with pytest.raises(ValueError, match="unknown parts"):
        run_sklearn_bench(("scaler",))


def test_cli_bench_sklearn_json_to_stdout():
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "sklearn",
            "--part",
            "transformer",
            "--samples",
            "300",
            "--features",
            "2",
            "--dtype",
            "float32",
            "--repeat",
            "1",
            "--threads",
            "1",
            "--json",
            "-",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 1 and rows[0]["case"] == "300x2" and rows[0]["dtype"] == "float32"
    assert "StandardScaler" in result.stderr


def test_cli_bench_sklearn_listed_and_usage_errors():
    runner = CliRunner()
    assert "sklearn" in runner.invoke(main, ["bench", "--help"]).output
    result = runner.invoke(main, ["bench", "sklearn", "--part", "scaler"])
    assert result.exit_code == 2 and "'scaler' is not one of" in result.output
    result = runner.invoke(main, ["bench", "sklearn", "--threads", "100000"])
    assert result.exit_code == 2 and "CPUs this process may use" in result.output
