"""A tiny random model as a canonical checkpoint with a real sentencepiece tokenizer, and its exported artifacts.

Each AOTI compile or ExecuTorch lowering costs 15-60 s here, so the artifacts are built once per session and
shared by every test that reads them.
"""

import shutil
from pathlib import Path

import pytest
import torch

from torchat.checkpoint.base import Checkpoint
from torchat.checkpoint.canonical import write_canonical
from torchat.cli import main
from torchat.model import ModelArgs, Transformer

TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=160, max_seq_len=128)
MAX_SEQ_LEN = 48


def tiny_transformer(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**TINY_ARGS))
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init, so logits spread (scale ~5)
            parameter.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, botchan_sp_models) -> Path:
    """A canonical checkpoint directory (model.safetensors, model_args.json) plus tokenizer.model."""
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    model = tiny_transformer()
    write_canonical(Checkpoint(dict(model.state_dict()), model.args, {}), directory)
    shutil.copyfile(botchan_sp_models["bpe"], directory / "tokenizer.model")
    return directory


def export_tiny(checkpoint: Path, output: Path, *extra: str) -> None:
    rc = main(["export", "--checkpoint-dir", str(checkpoint), "--output-path", str(output),
               "--max-seq-length", str(MAX_SEQ_LEN), *extra])
    assert rc == 0, f"export to {output.name} failed"


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """suffix -> the tiny model exported through the CLI (.pt2, .so, .pte), each in its own directory."""
    artifacts = {}
    for suffix in (".pt2", ".so", ".pte"):
        directory = tmp_path_factory.mktemp(f"tiny{suffix.replace('.', '-')}")
        export_tiny(tiny_checkpoint, directory / f"model{suffix}")
        artifacts[suffix] = directory / f"model{suffix}"
    return artifacts
