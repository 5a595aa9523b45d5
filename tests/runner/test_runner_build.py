"""The runner builds: the backend is chosen by a compile definition and the shared source refuses to compile
without exactly one (torchchat's misspelled-macro runner is the cautionary tale), and `doit runner:BACKEND`
publishes run + tokenize under a key of the sources and toolchain, so an unchanged rerun builds nothing."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from torchat import spec, store

RUNNER = Path(__file__).resolve().parents[2] / "runner"
CXX = os.environ.get("CXX", "c++")


def compile_model_h(*defines: str) -> subprocess.CompletedProcess:
    source = '#include "model.h"\nint main() { return 0; }\n'
    return subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-I", str(RUNNER), *[f"-D{d}" for d in defines],
                           "-x", "c++", "-"], input=source, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")
@pytest.mark.parametrize("defines", [(), ("TORCHAT_BACKEND_AOTI", "TORCHAT_BACKEND_ET"), ("TORCHAT_BACKEND_AOIT",)],
                         ids=["none", "both", "misspelled"])
def test_the_runner_does_not_compile_without_exactly_one_backend(defines):
    result = compile_model_h(*defines)
    assert result.returncode != 0 and "define exactly one of TORCHAT_BACKEND_AOTI or TORCHAT_BACKEND_ET" in result.stderr


@pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")
@pytest.mark.parametrize("define", ["TORCHAT_BACKEND_AOTI", "TORCHAT_BACKEND_ET"])
def test_one_backend_compiles(define):
    assert compile_model_h(define).returncode == 0


@pytest.mark.parametrize(("backend", "project"), [("aoti", "runner-aoti"), ("et", "runner-et")])
def test_each_cmake_project_defines_its_own_backend(backend, project):
    text = (RUNNER.parent / project / "CMakeLists.txt").read_text()
    assert f"target_compile_definitions(run PRIVATE TORCHAT_BACKEND_{backend.upper()})" in text
    assert f"model_{backend}.cpp" in text


def test_the_runner_step_key_covers_the_shared_sources_and_the_compiler():
    node = spec.load_catalog().runner_node(spec.Backend.ET)
    assert {"runner", "runner-et"} <= set(node.code)
    assert set(spec.native_toolchain()) == {"cxx", "cmake", "python_prefix"} and "native" in node.spec


def test_doit_runner_et_publishes_and_an_unchanged_rerun_builds_nothing(tmp_path, monkeypatch, runner_et):
    """The store realizes the step (`python -m torchat runner --backend et`): run and tokenize in the manifest;
    the second realization finds the artifact complete. (runner_et first: the CMake build directory is warm.)"""
    monkeypatch.setenv("TORCHAT_ARTIFACTS", str(tmp_path / "artifacts"))
    node = spec.load_catalog().runner_node(spec.Backend.ET)
    store._found.clear()
    directory, manifest = store.realize(node)
    assert set(manifest["outputs"]) == {"run", "tokenize"}
    assert subprocess.run([str(directory / "run"), "-h"], capture_output=True).returncode == 0
    mtime = (directory / "run").stat().st_mtime_ns
    store._found.clear()
    assert store.is_done(node)
    assert store.realize(node)[0] == directory and (directory / "run").stat().st_mtime_ns == mtime
    store._found.clear()
