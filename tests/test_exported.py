"""Exported artifacts behind the TextModel interface: the CLI streams the same text from an artifact as from the
eager checkpoint, errors are one line, and generation never imports the exporters."""

import subprocess
import sys

from tiny_model import TINY_CONTEXT

from torchat.cli import main

PROMPT = ["--prompt", "The cat sat on the", "--max-new-tokens", "20"]


def test_generate_from_pte_prints_what_eager_prints(tiny_checkpoint, tiny_artifacts, capsys):
    flags = [*PROMPT, "--max-seq-length", str(TINY_CONTEXT)]
    assert main(["generate", "--checkpoint-dir", str(tiny_checkpoint), *flags]) == 0
    eager = capsys.readouterr()
    assert main(["generate", "--pte-path", str(tiny_artifacts[".pte"]), *flags]) == 0
    exported = capsys.readouterr()
    assert exported.out == eager.out and len(eager.out) > len("The cat sat on the")
    assert "decode" in exported.err and "prefill" in exported.err  # the same stats line


def test_two_models_named_is_an_error(tiny_checkpoint, tiny_artifacts, capsys):
    assert main(["generate", str(tiny_checkpoint), "--pte-path", str(tiny_artifacts[".pte"])]) == 1
    assert "name the model once" in capsys.readouterr().err
    assert main(["generate", "--pte-path", str(tiny_artifacts[".pte"]), "--aoti-package-path",
                 str(tiny_artifacts[".pt2"])]) == 1
    assert "pass only one of" in capsys.readouterr().err


def test_longer_context_than_exported_is_an_error(tiny_artifacts, capsys):
    assert main(["generate", "--pte-path", str(tiny_artifacts[".pte"]), "--max-seq-length",
                 str(TINY_CONTEXT + 1)]) == 1
    assert "re-export it with a larger --max-seq-length" in capsys.readouterr().err


def test_missing_tokenizer_names_the_fix_and_a_checkpoint_lends_its_own(tiny_checkpoint, tiny_artifacts, tmp_path,
                                                                          capsys):
    moved = tmp_path / "model.pte"
    moved.write_bytes(tiny_artifacts[".pte"].read_bytes())
    assert main(["generate", "--pte-path", str(moved)]) == 1
    assert "pass --tokenizer-path" in capsys.readouterr().err
    # the seed's form: `--pte-path m.pte --checkpoint-dir CKPT` reads the checkpoint's tokenizer
    assert main(["generate", "--pte-path", str(moved), "--checkpoint-dir", str(tiny_checkpoint), *PROMPT]) == 0
    lent = capsys.readouterr().out
    assert main(["generate", "--pte-path", str(tiny_artifacts[".pte"]), *PROMPT]) == 0
    assert lent == capsys.readouterr().out


def test_not_an_artifact_is_a_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "model.pt2"
    bogus.write_bytes(b"not a zip")
    assert main(["generate", "--aoti-package-path", str(bogus)]) == 1
    assert "not a torchat AOTI package" in capsys.readouterr().err


def test_generation_never_imports_the_exporters(tiny_artifacts):
    """Neither importing the generate verb and the model opener nor generating from a .pte loads the lowering, nor
    ExecuTorch's compiler or Inductor (what made a .pte's cold start 18 s)."""
    code = ("import sys, torchat.cli.generate, torchat.model_source, torchat.exported\n"
            "from torchat.cli import main\n"
            f"assert main(['generate', '--pte-path', {str(tiny_artifacts['.pte'])!r}, '--max-new-tokens', '2']) == 0\n"
            "bad = [m for m in sys.modules if m.startswith(('torchat.lowering', 'torchat.cli.export',\n"
            "                                                 'executorch.exir', 'torch._inductor'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
