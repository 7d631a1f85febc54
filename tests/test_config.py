"""Environment settings (numbabn.config): what each accepts, and that a bad value
stops the import of numbabn.config (at numbabn's first use) with a message naming it
instead of meaning something else."""

import os
import subprocess
import sys

import pytest

from numbabn import config

_SHOW = "from numbabn import config as c; print(c.QUIET, c.COMPILE_AHEAD, c.TORCH_OPENMP, c.NUM_THREADS, c.CHUNK)"
_NAMES = ("NUMBABN_QUIET", "NUMBABN_COMPILE_AHEAD", "NUMBABN_TORCH_OPENMP", "NUMBABN_NUM_THREADS", "NUMBABN_CHUNK")


def _import(**env):
    full = {k: v for k, v in os.environ.items() if k not in _NAMES}
    full.update(env)
    return subprocess.run([sys.executable, "-c", _SHOW], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("Yes", True), (" ON ", True), ("0", False), ("false", False), ("NO", False)]
    + [("off", False), ("", None), (None, None)],
)
def test_switch_values(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("NUMBABN_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("NUMBABN_TEST_SWITCH", raw)
    for default in (True, False):
        assert config._switch("NUMBABN_TEST_SWITCH", default) is (default if expected is None else expected)


@pytest.mark.parametrize("raw", ["2", "maybe", "y", "disabled"])
def test_switch_rejects_what_it_cannot_read(monkeypatch, raw):
    monkeypatch.setenv("NUMBABN_TEST_SWITCH", raw)
    with pytest.raises(
        ValueError, match=f"NUMBABN_TEST_SWITCH must be one of 1/true/yes/on or 0/false/no/off, got '{raw}'"
    ):
        config._switch("NUMBABN_TEST_SWITCH", True)


@pytest.mark.parametrize(
    ("raw", "least", "message"),
    [("abc", 1, "a positive"), ("0", 1, "a positive"), ("-1", 0, "a non-negative"), ("1.5", 0, "a non-negative")],
)
def test_integers_reject_what_they_cannot_use(monkeypatch, raw, least, message):
    monkeypatch.setenv("NUMBABN_TEST_INT", raw)
    with pytest.raises(ValueError, match=f"NUMBABN_TEST_INT must be {message} integer, got '{raw}'"):
        config._positive_int("NUMBABN_TEST_INT", 5, least)
    monkeypatch.setenv("NUMBABN_TEST_INT", "7")
    assert config._positive_int("NUMBABN_TEST_INT", 5, least) == 7


def test_the_settings_as_a_fresh_process_reads_them():
    """'false' switches off (it used to leave COMPILE_AHEAD and TORCH_OPENMP on, and
    to turn QUIET on); unset gives the documented defaults; a bad value stops the import."""
    off = _import(NUMBABN_QUIET="false", NUMBABN_COMPILE_AHEAD="false", NUMBABN_TORCH_OPENMP="off")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[:3] == ["False", "False", "False"]
    on = _import(NUMBABN_QUIET="yes", NUMBABN_COMPILE_AHEAD="1", NUMBABN_TORCH_OPENMP="TRUE", NUMBABN_NUM_THREADS="3")
    assert on.stdout.split() == ["True", "True", "True", "3", "16384"]
    assert _import().stdout.split() == ["False", "True", "True", "None", "16384"]
    bad = _import(NUMBABN_COMPILE_AHEAD="nope")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "numbabn.config.SettingError: environment variable NUMBABN_COMPILE_AHEAD must be one of 1/true/yes/on "
        "or 0/false/no/off, got 'nope'"
    )


def test_an_empty_or_blank_setting_is_unset_for_every_kind():
    """Switches took an empty value as unset while integers refused it
    (``NUMBABN_CHUNK=`` stopped the import); a blank NUMBABN_NUM_THREADS gave 0 threads."""
    blank = _import(NUMBABN_QUIET="", NUMBABN_COMPILE_AHEAD=" ", NUMBABN_NUM_THREADS=" ", NUMBABN_CHUNK="")
    assert blank.returncode == 0, blank.stderr
    assert blank.stdout.split() == ["False", "True", "True", "None", "16384"]


def test_integers_have_an_upper_bound(monkeypatch):
    # a value past int64 used to pass the import and fail at the first kernel call
    # with a Numba typing error that did not name the variable
    monkeypatch.setenv("NUMBABN_TEST_INT", str(2**64))
    with pytest.raises(config.SettingError, match="NUMBABN_TEST_INT must be at most"):
        config._positive_int("NUMBABN_TEST_INT", 5)
    monkeypatch.setenv("NUMBABN_TEST_INT", "1024")
    assert config._positive_int("NUMBABN_TEST_INT", 5, most=1024) == 1024


@pytest.mark.parametrize("setting", ["NUMBABN_CHUNK=0", "NUMBABN_QUIET=maybe", "NUMBABN_STREAM_MIN_MB=-1"])
def test_the_command_prints_a_bad_setting_as_one_line(setting):
    name, value = setting.split("=")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBABN_")}
    env[name] = value
    done = subprocess.run(
        [sys.executable, "-m", "numbabn", "info"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: environment variable {name} must be "), lines
    assert "Traceback" not in done.stderr
