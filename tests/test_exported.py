"""Exported artifacts behind the TextModel interface: the CLI streams the same text from an artifact as from the
eager checkpoint, errors are one line, and generation never imports the exporters."""

import subprocess
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "lowering"))
from lowering_fixtures import MAX_SEQ_LEN, export_tiny  # noqa: E402

from torchat.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pte(tiny_checkpoint_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("pte") / "model.pte"
    export_tiny(tiny_checkpoint_dir, output)
    return output


@pytest.fixture(scope="module")
def tiny_checkpoint_dir(tmp_path_factory, botchan_sp_models):
    import shutil

    from lowering_fixtures import tiny_transformer
    from torchat.checkpoint.base import Checkpoint
    from torchat.checkpoint.canonical import write_canonical

    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    model = tiny_transformer()
    write_canonical(Checkpoint(dict(model.state_dict()), model.args, {}), directory)
    shutil.copyfile(botchan_sp_models["bpe"], directory / "tokenizer.model")
    return directory


def test_generate_from_pte_prints_what_eager_prints(tiny_checkpoint_dir, tiny_pte, capsys):
    flags = ["--prompt", "The cat sat on the", "--max-new-tokens", "20", "--max-seq-length", str(MAX_SEQ_LEN)]
    assert main(["generate", "--checkpoint-dir", str(tiny_checkpoint_dir), *flags]) == 0
    eager = capsys.readouterr()
    assert main(["generate", "--pte-path", str(tiny_pte), *flags]) == 0
    exported = capsys.readouterr()
    assert exported.out == eager.out and len(eager.out) > len("The cat sat on the")
    assert "decode" in exported.err and "prefill" in exported.err  # the same stats line


def test_artifact_and_checkpoint_together_is_an_error(tiny_checkpoint_dir, tiny_pte, capsys):
    assert main(["generate", "--checkpoint-dir", str(tiny_checkpoint_dir), "--pte-path", str(tiny_pte)]) == 1
    assert "not both" in capsys.readouterr().err


def test_longer_context_than_exported_is_an_error(tiny_pte, capsys):
    assert main(["generate", "--pte-path", str(tiny_pte), "--max-seq-length", str(MAX_SEQ_LEN + 1)]) == 1
    assert "re-export it with a larger --max-seq-length" in capsys.readouterr().err


def test_missing_tokenizer_names_the_fix(tiny_pte, tmp_path, capsys):
    moved = tmp_path / "model.pte"
    moved.write_bytes(tiny_pte.read_bytes())
    assert main(["generate", "--pte-path", str(moved)]) == 1
    assert "pass --tokenizer-path" in capsys.readouterr().err


def test_not_an_artifact_is_a_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "model.pt2"
    bogus.write_bytes(b"not a zip")
    assert main(["generate", "--aoti-package-path", str(bogus)]) == 1
    assert "not a torchat AOTI package" in capsys.readouterr().err


def test_generation_never_imports_the_exporters():
    code = ("import sys, torchat.generate_cli, torchat.exported, torchat.loader; "
            "bad = [m for m in sys.modules if m.startswith(('torchat.lowering', 'torchat.export_cli'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
