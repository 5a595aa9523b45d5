"""The doit graph end to end, in subprocesses: incremental rebuilds, crash safety, concurrency, names.

Steps run through the stub CLI of test_store (deterministic outputs, real `download`), except in
test_real_download_and_convert, which runs the real verbs on a random stories15M-shaped checkpoint. The graph
runs from a frozen copy of torchat/ and dodo.py: code digests are part of the keys, and the checkout changes
under the tests while others work in it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store import graph_env, stub_calls, write_tiny_targets
from tiny_model import write_stories_targets

from torchat import spec, store

DODO = spec.REPO_ROOT / "dodo.py"
HEAVY = ("torch", "torchao", "executorch", "numpy", "safetensors", "gguf", "transformers")


def doit_command(env: dict, *args: str, dodo: Path | None = None) -> list[str]:
    dodo = dodo or (Path(env["PYTHONPATH"]) / "dodo.py" if "PYTHONPATH" in env else DODO)
    return [sys.executable, "-m", "doit", "-f", str(dodo), *args]


def doit(env: dict, *args: str, dodo: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(doit_command(env, *args, dodo=dodo), env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def ran(result) -> set[str]:
    return {line[3:].strip() for line in result.stdout.splitlines() if line.startswith(".  ")}


def up_to_date(result) -> set[str]:
    return {line[3:].strip() for line in result.stdout.splitlines() if line.startswith("-- ")}


def copy_repo(destination: Path) -> Path:
    shutil.copytree(spec.REPO_ROOT / "torchat", destination / "torchat", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(DODO, destination / "dodo.py")
    return destination


@pytest.fixture(scope="module")
def frozen_repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture
def env(tmp_path, frozen_repo):
    write_tiny_targets(tmp_path / "targets")
    return {**graph_env(tmp_path), "PYTHONPATH": str(frozen_repo)}


def test_doit_list_shows_the_matrix_without_importing_torch():
    code = ("import sys\nfrom doit.doit_cmd import DoitMain\nfrom doit.cmd_base import DodoTaskLoader\n"
            f"rc = DoitMain(DodoTaskLoader()).run(['-f', {str(DODO)!r}, 'list', '--all'])\n"
            f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\nsys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "TORCHAT_TARGETS_DIR"})
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    builds = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("build:")]
    assert len(builds) >= 100 and "build:smollm2-135m-int4-aoti" in builds
    assert "build:smollm2-135m-int4-et" not in builds  # refused: XNNPACK would be silently wrong


def test_a_second_build_is_up_to_date_and_fast(env):
    first = doit(env, "build:alpha-q8-aoti")
    chain = {"download:alpha", "convert:alpha", "quantize:alpha-q8-bf16", "build:alpha-q8-aoti"}
    assert ran(first) == chain
    start = time.perf_counter()
    second = doit(env, "build:alpha-q8-aoti")
    elapsed = time.perf_counter() - start
    assert ran(second) == set() and up_to_date(second) == chain
    assert elapsed < 2.0
    # lowering to a second backend of the same dtype quantizes once
    assert ran(doit(env, "build:alpha-q8-eager")) == set()


def test_changing_one_preset_rebuilds_only_its_quantize_and_lower_tasks(env, tmp_path):
    doit(env, "build")
    before = len(stub_calls(tmp_path))
    write_tiny_targets(tmp_path / "targets", q8_groupsize=32)
    result = doit(env, "build")
    assert ran(result) == {f"quantize:{m}-q8-{d}" for m in ("alpha", "beta") for d in ("bf16", "fp32")} | {
        f"build:{m}-q8-{b}" for m in ("alpha", "beta") for b in ("aoti", "et")}
    assert "build:alpha-q8-eager" in up_to_date(result)  # eager's artifact is the quantized checkpoint, just rebuilt
    assert sorted(stub_calls(tmp_path)[before:]) == ["export"] * 4 + ["quantize"] * 4


def test_changing_a_models_source_rebuilds_its_chain_only(env, tmp_path):
    doit(env, "build")
    write_tiny_targets(tmp_path / "targets", {"alpha": b"alpha weights, retrained", "beta": b"beta weights"})
    result = doit(env, "build")
    assert ran(result) and all(":alpha" in task for task in ran(result))
    assert {"download:alpha", "convert:alpha", "quantize:alpha-none-bf16", "build:alpha-none-aoti"} <= ran(result)


def test_touching_inputs_and_outputs_without_changing_them_rebuilds_nothing(env, tmp_path):
    doit(env, "build")
    later = time.time_ns() + 10**9
    for path in [*(tmp_path / "targets").iterdir(), *(tmp_path / "artifacts").rglob("*")]:
        if path.is_file() and path.name != "manifest.json":
            os.utime(path, ns=(later, later))
    assert ran(doit(env, "build")) == set()


def test_editing_one_steps_code_reruns_that_steps_tasks_only(env, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {**env, "PYTHONPATH": str(repo)}
    doit(env, "build", dodo=repo / "dodo.py")
    (repo / "torchat" / "lowering" / "edited_by_test.py").write_text("# a change to the lowering code\n")
    assert ran(doit(env, "build", dodo=repo / "dodo.py")) == {
        f"build:{m}-{q}-{b}" for m in ("alpha", "beta") for q in ("none", "q8") for b in ("aoti", "et")}
    with open(repo / spec.verb_code_path(spec.STEPS[spec.Step.QUANTIZE].verb), "a") as f:
        f.write("# a change to the quantize verb\n")
    # quantize reruns; its outputs are the same bytes, so nothing downstream does
    assert ran(doit(env, "build", dodo=repo / "dodo.py")) == {
        f"quantize:{m}-{q}-{d}" for m in ("alpha", "beta") for q in ("none", "q8") for d in ("bf16", "fp32")}


def test_deleting_the_doit_database_rebuilds_nothing_and_keeps_artifacts_valid(env, tmp_path):
    doit(env, "build")
    calls = len(stub_calls(tmp_path))
    Path(env["TORCHAT_DOIT_DB"]).unlink()
    result = doit(env, "build")
    assert ran(result) == set() and len(stub_calls(tmp_path)) == calls
    published = [d for d in (tmp_path / "artifacts").glob("*/*") if not d.name.startswith(".")]
    assert published and all(store.check_artifact(d) for d in published)


def test_a_build_killed_mid_step_leaves_nothing_treated_as_done(env, tmp_path):
    command = doit_command(env, "build:alpha-q8-aoti")
    process = subprocess.Popen(command, env={**os.environ, **env, "STUB_SLEEP": "quantize"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    quantize_dir = tmp_path / "artifacts" / "quantize"
    deadline = time.time() + 60
    while not list(quantize_dir.glob(".tmp-*/model.safetensors")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert [d for d in quantize_dir.iterdir() if not d.name.startswith(".")] == []
    result = doit(env, "build:alpha-q8-aoti")
    assert {"quantize:alpha-q8-bf16", "build:alpha-q8-aoti"} <= ran(result)
    (published,) = [d for d in quantize_dir.iterdir() if not d.name.startswith(".")]
    assert store.check_artifact(published) and not list(quantize_dir.glob(".tmp-*"))


def test_a_failed_step_is_never_recorded_done(env):
    failed = doit({**env, "STUB_FAIL": "export"}, "build:alpha-none-aoti", check=False)
    assert failed.returncode == 1 and "build:alpha-none-aoti was not built" in failed.stderr
    assert "build:alpha-none-aoti" in ran(doit(env, "build:alpha-none-aoti"))


@pytest.mark.parametrize("name, message", [
    ("build:alpha-q9-aoti", "unknown quant preset 'q9'; choose one of: none, q8"),
    ("build:gamma-q8-aoti", "unknown model 'gamma'; choose one of: alpha, beta"),
    ("build:alpha-q8-tpu", "unknown backend 'tpu'; choose one of: aoti, eager, et"),
    ("build:alpha-q8-fp8-aoti", "unknown quant preset 'fp8'"),
    ("download:gamma", "unknown model 'gamma'; choose one of: alpha, beta"),
])
def test_unknown_names_fail_with_the_valid_choices(env, name, message):
    result = doit(env, name, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_long_and_off_matrix_names_build(env, tmp_path):
    assert "build:alpha-q8-aoti" in ran(doit(env, "build:alpha-q8-bf16-aoti"))  # the canonical task
    off_matrix = doit(env, "build:alpha-q8-fp16-aoti")
    assert {"quantize:alpha-q8-fp16", "build:alpha-q8-fp16-aoti"} <= ran(off_matrix)
    assert "build:alpha-q8-fp16-aoti" not in doit(env, "list", "--all").stdout


def test_wildcards_and_two_processes_in_parallel(env, tmp_path):
    doit(env, "-n", "2", "build:alpha-*")
    built = {d.name[17:] for d in (tmp_path / "artifacts" / "build").iterdir() if not d.name.startswith(".")}
    assert built == {f"alpha-{q}-{b}" for q in ("none", "q8") for b in ("aoti", "et")}


def test_two_doit_processes_at_once_both_succeed_and_build_each_key_once(env, tmp_path):
    command = doit_command(env, "build")
    processes = [subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    calls = stub_calls(tmp_path)
    assert (calls.count("convert"), calls.count("quantize"), calls.count("export")) == (2, 8, 8)
    assert ran(doit(env, "build")) == set()


def test_clean_and_info(env, tmp_path):
    doit(env, "build:alpha-none-aoti")
    assert "status     : up-to-date" in doit(env, "info", "build:alpha-none-aoti").stdout
    cleaned = doit(env, "clean", "build:alpha-none-aoti")
    assert "removed" in cleaned.stdout
    assert "status     : run" in doit(env, "info", "build:alpha-none-aoti", check=False).stdout
    assert ran(doit(env, "build:alpha-none-aoti")) == {"build:alpha-none-aoti"}


def test_real_download_and_convert(tmp_path, frozen_repo, mistral_sentencepiece):
    """The real verbs on a random stories15M-shaped llama2.c checkpoint."""
    targets = write_stories_targets(tmp_path / "targets", mistral_sentencepiece)
    shutil.copy(spec.REPO_ROOT / "targets" / "matrix.toml", targets / "matrix.toml")
    (targets / "matrix.toml").write_text((targets / "matrix.toml").read_text().replace(
        'model = "smollm2-135m"', 'model = "tiny"').replace('models = ["smollm2-135m"]', 'models = ["tiny"]'))
    env = {k: v for k, v in graph_env(tmp_path).items() if k != "TORCHAT_STEP_CLI"}
    env["PYTHONPATH"] = str(frozen_repo)
    assert ran(doit(env, "convert:tiny")) == {"download:tiny", "convert:tiny"}
    (converted,) = (tmp_path / "artifacts" / "convert").glob("*-tiny")
    assert {"model.safetensors", "model_args.json", "metadata.json", "tokenizer.model"} <= {
        p.name for p in converted.iterdir()}
    assert store.check_artifact(converted)
    assert ran(doit(env, "convert:tiny")) == set()
    # eager's artifact is the quantized checkpoint
    assert "quantize:tiny-none-bf16" in ran(doit(env, "build:tiny-none-eager"))
    (quantized,) = (tmp_path / "artifacts" / "quantize").glob("*-tiny-none-bf16")
    assert store.check_artifact(quantized) and (quantized / "model.safetensors").is_file()
