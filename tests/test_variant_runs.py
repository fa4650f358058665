"""A comparison's runs start as children forked from a zygote (longctx.experiments.variant): each takes
the driver's environment, working folder and stderr as they are when it starts (not as they were when the zygote
started), ignores the terminal's SIGINT and a scheduler's SIGTERM (the driver passes both on), holds SIGUSR1 until it asks for it, and returns its exit code."""
import os
import signal
import sys

import pytest

from longctx.experiments import variant


def report(argv):
    """A child's body: print what it sees, exit with argv[0]."""
    blocked = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print(f"env={os.environ.get('LONGCTX_TEST_VALUE')} cwd={os.path.basename(os.getcwd())} sigint={signal.getsignal(signal.SIGINT) == signal.SIG_IGN} "
          f"sigterm={signal.getsignal(signal.SIGTERM) == signal.SIG_IGN} usr1_blocked={blocked}", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    return int(argv[0])


def start(code, tmp_path, name):
    log = tmp_path / name
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        run = variant.start_child(report, [str(code)], dict(os.environ), fd)
    finally:
        os.close(fd)
    return run, log


@pytest.mark.slow  # the zygote imports torch, transformers and the trainer once per test process
def test_children_take_the_drivers_environment_and_output_at_their_start(tmp_path, monkeypatch):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    monkeypatch.setenv("LONGCTX_TEST_VALUE", "first")
    run, log = start(0, tmp_path, "a.txt")  # starts the zygote (if no earlier test did) with "first"
    assert run.wait() == 0 and run.returncode == 0
    assert log.read_text().splitlines() == ["env=first cwd=one sigint=True sigterm=True usr1_blocked=True", "to stderr"]
    monkeypatch.setenv("LONGCTX_TEST_VALUE", "second")  # the zygote still has "first" (and "one")
    monkeypatch.chdir(tmp_path / "two")
    run, log = start(3, tmp_path, "b.txt")
    assert run.wait() == 3
    assert log.read_text().splitlines()[0] == "env=second cwd=two sigint=True sigterm=True usr1_blocked=True"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the driver's own, restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
