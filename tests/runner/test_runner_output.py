"""What a user sees from the C++ runners: the text ends with a newline before the stats line, even where stdout and
stderr go to one pipe (stdout is then block-buffered, and the stats line used to land inside the text: "...provide
you withachieved tok/s"); ExecuTorch's informational log lines (`I 00:00:00.000 executorch:cpuinfo_utils.cpp...`)
only with -v/--verbose."""

import re
import subprocess

import pytest
from runner_fixtures import run_runner, runner_for

PROMPT = "Hello, my name is"
ET_LOG_LINE = re.compile(r"^[DIEF] \d\d:\d\d:\d\d\.\d+ executorch:")


def run_merged(binary, model, tokenizer_bin, *args: str) -> subprocess.CompletedProcess:
    """The runner with stderr into the same pipe as stdout, as `run ... 2>&1 | less` or a CI log has it."""
    return subprocess.run([str(binary), str(model), "-z", str(tokenizer_bin), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_the_stats_line_is_its_own_line_after_the_text(request, tiny_artifacts, tiny_tokenizer_bin, suffix):
    runner, artifact = runner_for(request, suffix), tiny_artifacts[suffix]
    separate = run_runner(runner, artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "12")
    assert separate.returncode == 0, separate.stderr
    assert separate.stdout.startswith(PROMPT) and separate.stdout.endswith("\n")

    merged = run_merged(runner, artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "12")
    assert merged.returncode == 0, merged.stdout
    text, stats = merged.stdout[:len(separate.stdout)], merged.stdout[len(separate.stdout):]
    assert text == separate.stdout  # greedy: the same text, whole, before anything from stderr
    assert stats.startswith("achieved tok/s: ") and stats.count("\n") == 1 and stats.endswith("\n"), stats


def test_ids_output_ends_its_line_before_the_stats(runner_et, tiny_artifacts, tiny_tokenizer_bin):
    merged = run_merged(runner_et, tiny_artifacts[".pte"], tiny_tokenizer_bin, "-i", PROMPT, "-n", "5", "-o", "ids")
    first, second = merged.stdout.splitlines()
    assert len(first.split()) == 5 and all(part.isdigit() for part in first.split())
    assert second.startswith("achieved tok/s: ")


def test_chat_answers_end_their_lines_before_the_stats(runner_et, tiny_artifacts, tiny_tokenizer_bin):
    merged = run_merged(runner_et, tiny_artifacts[".pte"], tiny_tokenizer_bin, "-m", "chat", "-n", "6", "-i", "Hi")
    assert merged.returncode == 0, merged.stdout
    assert merged.stdout.endswith("\n") and merged.stdout.splitlines()[-1].startswith("achieved tok/s: ")


def test_executorch_info_lines_only_with_verbose(runner_et, tiny_artifacts, tiny_tokenizer_bin):
    artifact = tiny_artifacts[".pte"]
    quiet = run_runner(runner_et, artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "4")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.startswith("achieved tok/s: ") and quiet.stderr.count("\n") == 1, quiet.stderr
    for flag in ("-v", "--verbose"):
        verbose = run_runner(runner_et, artifact, tiny_tokenizer_bin, flag, "-i", PROMPT, "-n", "4")
        assert verbose.returncode == 0, verbose.stderr
        log_lines = [line for line in verbose.stderr.splitlines() if ET_LOG_LINE.match(line)]
        assert any(line.startswith("I ") for line in log_lines), verbose.stderr
        assert verbose.stdout == quiet.stdout  # the flag changes stderr only


def test_executorch_errors_show_without_verbose(runner_et, tiny_tokenizer_bin, tmp_path):
    """ExecuTorch's error lines explain the one-line error that follows, so they are never hidden."""
    corrupt = tmp_path / "corrupt.pte"
    corrupt.write_bytes(b"PK\3\4 not really" * 100)
    result = run_runner(runner_et, corrupt, tiny_tokenizer_bin, "-i", "x")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("run: error: ") and all(line.startswith("E ") for line in lines[:-1]), lines
    assert not any(line.startswith("I ") for line in lines)


def test_verbose_on_the_aoti_runner_changes_nothing_on_stdout(runner_aoti, tiny_artifacts, tiny_tokenizer_bin):
    artifact = tiny_artifacts[".pt2"]
    quiet = run_runner(runner_aoti, artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "4")
    verbose = run_runner(runner_aoti, artifact, tiny_tokenizer_bin, "-v", "-i", PROMPT, "-n", "4")
    assert quiet.returncode == verbose.returncode == 0, (quiet.stderr, verbose.stderr)
    assert verbose.stdout == quiet.stdout


def test_help_names_verbose(runner_et):
    result = subprocess.run([str(runner_et), "-h"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "-v, --verbose" in result.stdout
