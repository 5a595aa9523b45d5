"""The one tiny random model of the unit tests: its arguments, a seeded Transformer, and that model written as a
canonical checkpoint directory with a tokenizer beside it (what the `torchat` verbs open).

A test that needs another shape names the argument that differs, `tiny_args(n_kv_heads=4)`, instead of defining a
model of its own. The fixtures in tests/conftest.py build the shared checkpoint (TINY_CHECKPOINT_ARGS: SmolLM2's
vocabulary, so that its BPE tokenizer and ChatML template fit) and its exports once per session.
"""

import shutil
from pathlib import Path

import torch

from torchat.model import ModelArgs, Transformer

# 4 query heads sharing 2 key/value heads (grouped-query attention) of head_dim 16, 2 layers
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=160, max_seq_len=128)
SMOLLM2_VOCAB_SIZE = 49152
# the shared checkpoint's model: SmolLM2's tokenizer.gguf beside it, small enough to export in seconds
TINY_CHECKPOINT_ARGS = dict(TINY_ARGS, vocab_size=SMOLLM2_VOCAB_SIZE)
# the KV cache length the shared checkpoint is exported with (below its context, as a real export's is)
TINY_CONTEXT = 96


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**(TINY_ARGS | overrides))


def tiny_transformer(args: ModelArgs | None = None, *, seed: int = 0, std: float | None = 0.3) -> Transformer:
    """A seeded random Transformer in eval mode. With `std`, every parameter is drawn from N(0, std): larger than
    torch's default init, so that the logits spread (scale ~5) and greedy paths are no runs of one token; with
    None, torch's default init."""
    torch.manual_seed(seed)
    model = Transformer(args or tiny_args())
    if std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, std)
    return model.eval()


def checkpoint_transformer() -> Transformer:
    """The model the shared tiny checkpoint holds (the same seed: the same weights), built in memory."""
    return tiny_transformer(ModelArgs(**TINY_CHECKPOINT_ARGS))


def write_tiny_checkpoint(directory: Path, tokenizer: Path, model: Transformer) -> Path:
    """`model` as a canonical checkpoint (model.safetensors, model_args.json) with its tokenizer beside it: a GGUF's
    vocabulary as tokenizer.gguf, any other tokenizer file under its own name."""
    from torchat.checkpoint.base import Checkpoint
    from torchat.checkpoint.canonical import write_canonical
    from torchat.convert import write_tokenizer_gguf

    write_canonical(Checkpoint(dict(model.state_dict()), model.args, {}), directory)
    if tokenizer.suffix == ".gguf":
        write_tokenizer_gguf(tokenizer, directory / "tokenizer.gguf")
    else:
        shutil.copyfile(tokenizer, directory / tokenizer.name)
    return directory


def write_stories_targets(root: Path, tokenizer: Path, presets: dict[str, str] | None = None,
                          backends: str = '"*"', std: float = 0.02) -> Path:
    """A targets dir declaring one catalog model, `tiny`: a random llama2.c checkpoint of stories15M's shape (a
    known config, so the catalog takes it) with `tokenizer` beside it, both pinned; `presets` maps a preset name to
    its quant as a TOML inline table ("none" = {} always), the matrix builds every preset on `backends`."""
    import hashlib

    from torchat.checkpoint.base import expected_shapes
    from torchat.configs import KNOWN_CONFIGS

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    args = ModelArgs(**KNOWN_CONFIGS["stories15M"])
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(shape, generator=generator) * std for k, shape in expected_shapes(args).items()}
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state_dict, "model_args": {"dim": args.dim, "n_layers": args.n_layers,
                                                    "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                                                    "vocab_size": args.vocab_size, "max_seq_len": args.max_seq_len}},
               root / "tiny.pt")
    shutil.copyfile(tokenizer, root / "tokenizer.model")
    (root / "models.toml").write_text(
        f'[tiny]\nconfig = "stories15M"\nformat = "llama2c"\nsource = "path:tiny.pt"\n'
        f'sha256 = "{digest(root / "tiny.pt")}"\n'
        f'tokenizer = {{ source = "path:tokenizer.model", sha256 = "{digest(root / "tokenizer.model")}" }}\n')
    presets = {"none": "{}", **(presets or {})}
    (root / "quant.toml").write_text("".join(f'["{name}"]\nquant = {quant}\n\n' for name, quant in presets.items()))
    (root / "matrix.toml").write_text(f'[defaults]\nmodel = "tiny"\n\n[[matrix]]\nmodels = "*"\nquants = "*"\n'
                                      f'backends = {backends}\n')
    return root
