"""A process that runs a .pte starts with OpenMP on one thread (torchat/threads.py), set before torch loads."""

import os
import subprocess
import sys

from torchat.threads import prepare_for_pte, pte_child_environment, runs_pte

PROBE = ("from torchat.threads import prepare_for_pte; print(prepare_for_pte()); import torch; "
         "print(torch.get_num_threads())")


def probe(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_runs_pte_sees_both_flag_forms():
    assert runs_pte(["generate", "--pte-path", "m.pte", "--prompt", "hi"])
    assert runs_pte(["chat", "--pte-path=m.pte"])
    assert not runs_pte(["generate", "--aoti-package-path", "m.pt2"])
    assert not runs_pte(["export", "--output-pte-path", "m.pte"])


def test_prepared_process_runs_torch_on_one_thread():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert probe(env) == ["True", "1"]


def test_users_choice_of_threads_stands():
    assert probe({**os.environ, "OMP_NUM_THREADS": "2"}) == ["True", "2"]
    assert pte_child_environment()["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "1")


def test_too_late_once_torch_is_imported():
    import torch  # noqa: F401  (this test process has it already; prepare_for_pte must say it changed nothing)

    before = os.environ.get("OMP_NUM_THREADS")
    assert prepare_for_pte() is False
    assert os.environ.get("OMP_NUM_THREADS") == before
