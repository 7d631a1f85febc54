"""The numbabn.torch benchmark (numbabn.bench.torch_modules) runs and its variants compute the same thing
(timings are never asserted: see bench/torch_bench.py for the measurements)."""

import pytest

pytest.importorskip("torch", reason="PyTorch is not installed")

from click.testing import CliRunner  # noqa: E402

from numbabn import config  # noqa: E402
from numbabn.bench import torch_modules as benchmark  # noqa: E402
from numbabn.bench.cases import SUITES  # noqa: E402
from numbabn.cli import main  # noqa: E402


def test_bn_rows_cover_the_cases_with_both_layouts(monkeypatch):
    # The numbabn columns time the kernels even where the modules would hand the
    # input to PyTorch by default (here: every case), and say so.
    import numbabn

    calls = []
    forward = numbabn.batch_norm_forward
    monkeypatch.setattr(numbabn, "batch_norm_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 1 << 30)
    rows = benchmark.run_bn(SUITES["tiny"], threads=1, repeat=1)
    assert calls and config.TORCH_NATIVE_BELOW == 1 << 30
    assert [r["default"] for r in rows] == ["torch", "torch"]
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    assert [r["default"] for r in benchmark.run_bn(SUITES["tiny"][:1], threads=1, repeat=1)] == ["kernels"]
    assert [r["case"] for r in rows] == ["tiny", "tiny-conv"]
    assert all(r["native_ms"] > 0 and r["fused_ms"] > 0 and r["threads"] == r["numbabn_threads"] == 1 for r in rows)
    assert "native+ReLU ms" in benchmark.format_bn(rows)
    assert all(r["native_res_ms"] > 0 and r["res_fused_ms"] > 0 for r in rows)
    assert "native+add+ReLU ms" in benchmark.format_bn(rows)
    name, x, _ = benchmark._bn_case(SUITES["default"][2])  # resnet-nhwc
    assert name == "BatchNorm2d" and x.shape == (64, 64, 56, 56) and not x.is_contiguous()


def test_step_variants_train_the_same_network():
    rows = benchmark.run_step(threads=1, repeat=1, batch=4)
    assert [r["variant"] for r in rows] == [
        "native BN",
        "numbabn BN",
        "numbabn BN + fused ReLU",
        "numbabn BN + fused ReLU + residual",
    ]
    losses = [r["final_loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-3 * max(1.0, abs(losses[0]))
    assert "x native" in benchmark.format_step(rows)


def test_step_says_how_many_bn_calls_ran_the_kernels(monkeypatch):
    # The rows said "numbabn BN" even when every BN input was below the threshold and
    # ran PyTorch's own op. The step is not forced onto the kernels; it says so.
    from numbabn.torch.modules import NumbabnBatchNorm

    methods = NumbabnBatchNorm.forward, NumbabnBatchNorm._torch_forward
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 1 << 30)
    rows = benchmark.run_step(threads=1, repeat=1, batch=4)
    assert (NumbabnBatchNorm.forward, NumbabnBatchNorm._torch_forward) == methods  # the counters are gone
    assert rows[0]["bn_calls"] is None and rows[0]["kernel_bn_calls"] is None  # native BN
    assert all(r["kernel_bn_calls"] == 0 and r["bn_calls"] == 20 for r in rows[1:])  # ResNet-18: 20 BNs
    text = benchmark.format_step(rows)
    assert "kernel BN calls" in text and "0 of 20" in text
    assert f"NUMBABN_TORCH_NATIVE_BELOW values (now {1 << 30})" in text.splitlines()[-1]
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    rows = benchmark.run_step(threads=1, repeat=1, batch=4)
    assert all(r["kernel_bn_calls"] == r["bn_calls"] == 20 for r in rows[1:])
    text = benchmark.format_step(rows)
    assert "20 of 20" in text and "NUMBABN_TORCH_NATIVE_BELOW" not in text


def test_cli_lists_the_torch_benchmark():
    result = CliRunner().invoke(main, ["bench", "torch", "--help"])
    assert result.exit_code == 0 and "ResNet-18" in result.output
    result = CliRunner().invoke(main, ["bench", "torch", "--threads", "100000"])
    assert result.exit_code == 2 and "--threads" in result.output
