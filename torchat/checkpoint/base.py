"""What every checkpoint reader returns, the canonical tensor names and shapes, and the rotary permutations."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from torchat.errors import TorchatError
from torchat.model import ModelArgs


@dataclass
class Checkpoint:
    """A checkpoint in torchat's canonical form.

    state_dict: Meta/gpt-fast names, q/k rows in the rotate-half rotary layout, floating point tensors.
    args: the ModelArgs the file itself states, or None when the file carries no configuration.
    metadata: what else the file tells (for example a GGUF's chat template, its tokenizer kind).
    """

    state_dict: dict[str, torch.Tensor]
    args: ModelArgs | None = None
    metadata: dict = field(default_factory=dict)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for a model of these args (no `output.weight` when tied)."""
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
        }
    return shapes


def check_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs, source: Path) -> None:
    """Raise a TorchatError naming the tensor and the file on a missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(args)
    missing = sorted(set(want) - set(state_dict))
    if missing:
        raise TorchatError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                           "the file is incomplete or is not a checkpoint of this model")
    extra = sorted(set(state_dict) - set(want) - {"output.weight"})
    if extra:
        raise TorchatError(f"{source}: unexpected tensor {extra[0]!r}; the config does not match this file "
                           "(check --params-table/--params-path)")
    for name, shape in want.items():
        if tuple(state_dict[name].shape) != shape:
            raise TorchatError(f"{source}: tensor {name!r} has shape {tuple(state_dict[name].shape)}, "
                               f"expected {shape}; the config does not match this file")


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k weight from Meta's interleaved-pair rotary layout to the rotate-half layout.

    Within each head Meta pairs rows (0,1), (2,3), ...; rotate-half pairs row i with row i + head_dim/2.
    This is the permutation of Hugging Face's `convert_llama_weights_to_hf.py`.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_meta_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_layout(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Permute every q/k weight of a Meta-layout state dict into the model's rotate-half layout."""
    out = dict(state_dict)
    for name, tensor in state_dict.items():
        if name.endswith("attention.wq.weight"):
            out[name] = permute_meta_to_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            out[name] = permute_meta_to_hf(tensor, args.n_kv_heads)
    return out
