"""The documented outcomes (README "What batch norm really does", docs/what_bn_does.md)
rerun on the seed-0 configuration of each experiment's defaults. Marked slow (each
takes 10-60 s of one CPU core); deselect with ``-m "not slow"``.

Each test asserts the qualitative statement the docs make, with margins well inside
what the seed-0 run measured (the docs give the numbers), so that a change of
numerics that keeps the science passes and a change of the science fails.
"""

import pytest

from numbabn.train.experiments import EXPERIMENTS

pytestmark = pytest.mark.slow


def run(name, **kwargs):
    return EXPERIMENTS[name](seeds=[0], progress=False, **kwargs)


def test_dln_bn_sits_at_the_stability_edge_and_trains_faster():
    out = run("dln")
    for lr in ("lr=0.01", "lr=0.05"):
        entry = out[lr]
        bn = entry["edge"]["bn"]
        assert 0.8 < bn["beta_lr_over_2"]["median"] < 1.25 and 0.8 < bn["lambda_max_lr_over_2"]["median"] < 1.5
        # BN makes even a linear network's loss curve down somewhere (2 of 30 probes over
        # 3 seeds): λ_max·lr/2 is at most ‖H‖₂·lr/2
        assert bn["lambda_max_lr_over_2"]["median"] <= bn["hessian_lr_over_2"]["median"]
        assert entry["final"]["bn"]["train_loss"]["median"] < entry["final"]["standard"]["train_loss"]["median"]
        # BN does not reduce ICS in the deep linear network (the paper's Fig. 3b): larger ‖G − G′‖ at layer #9
        assert entry["ics"]["layer8"]["bn"]["l2"]["median"] > entry["ics"]["layer8"]["standard"]["l2"]["median"]
    # at lr 0.01 the standard net is far from its edge, so BN's β is much larger there
    small = out["lr=0.01"]
    assert small["edge"]["standard"]["beta_lr_over_2"]["median"] < 0.2
    assert small["measures"]["beta_smoothness"]["all"]["ratio"]["median"] > 10


def test_ics_bn_does_not_reduce_internal_covariate_shift():
    entry = run("ics")["lr=0.1"]["layer1"]
    assert entry["bn"]["l2"]["median"] > entry["standard"]["l2"]["median"]
    assert entry["bn"]["cosine"]["median"] < entry["standard"]["cosine"]["median"]
    assert entry["noisy"]["l2"]["median"] > entry["bn"]["l2"]["median"]


def test_vgg_bn_is_smoother_on_every_measure():
    out = run("vgg")["lr=0.1"]
    for measure in ("loss_band_width", "grad_pred_max", "grad_pred_relative", "beta_smoothness", "hessian_norm"):
        # seed 0: 0.005-0.42 (hessian_norm the largest)
        assert out["measures"][measure]["all"]["ratio"]["median"] < 0.6, measure
    assert out["edge"]["bn"]["beta_lr_over_2"]["median"] < out["edge"]["standard"]["beta_lr_over_2"]["median"]
    assert out["final"]["bn"]["train_loss"]["median"] < out["final"]["standard"]["train_loss"]["median"]


def test_landscape_mlp_bn_smoother_early_rougher_late():
    out = run("landscape")["lr=0.1"]
    band = out["measures"]["loss_band_width"]
    assert band["early"]["ratio"]["median"] < 0.2 and band["late"]["ratio"]["median"] > 1.5  # seed 0: 0.015, 2.8
    assert out["measures"]["grad_pred_relative"]["early"]["ratio"]["median"] < 0.5  # seed 0: 0.19
    assert out["final"]["standard"]["train_loss"]["median"] < out["final"]["bn"]["train_loss"]["median"]


def test_maxlr_bn_allows_larger_learning_rates():
    out = run("maxlr")
    for arch in ("mlp3", "mlp8", "vgg4", "dln25"):
        assert out[arch]["bn_larger"]["k"] == 1, arch
        assert out[arch]["ratio_bn_over_standard"]["median"] > 2, arch  # 3 seeds: 2.6-13.5


def test_noisy_and_lp_train_faster_than_standard():
    noisy = run("noisy")["lr=0.1"]["steps_to_95pct_train"]
    assert noisy["bn_first"]["k"] == noisy["noisy_first"]["k"] == 1
    lp = run("lp")["lr=0.1"]
    speed = lp["steps_to_95pct_train"]
    assert speed["l1_first"]["k"] == speed["l2_first"]["k"] == speed["bn_first"]["k"] == 1
    assert speed["linf_first"]["k"] == 0  # ℓ∞ is slower than the standard net
    assert lp["bn"]["beta_vs_standard"]["ratio"]["median"] > 1  # no smoother than the standard net here


def test_ioffe_bn_reaches_the_test_accuracy_first():
    out = run("ioffe")["lr=0.2"]
    assert out["steps_to_85pct_test"]["bn_first"]["k"] == 1  # seed 0: step 100 vs 600 (MNIST, probed every 100)
    assert out["bn"]["median_input_range"]["median"] < out["standard"]["median_input_range"]["median"]
