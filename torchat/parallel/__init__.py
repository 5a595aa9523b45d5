"""Tensor parallelism: one model over N processes (`--tp N`, ModelSource.tp), on torch.distributed.

    torchat generate --tp 2 ...                     starts 2 ranks on this machine itself (torchat.parallel.launch)
    torchrun --nproc-per-node 2 -m torchat generate --tp 2 ...      the same, launched by torchrun

- plan.py: what each rank holds (heads, the MLP's hidden dim, vocabulary rows) and the rank's own Transformer;
- torchat.checkpoint.sliced: each rank reads only its slices (safetensors memory-mapped, a GGUF's blocks);
- runtime.py: the process group (gloo on CPU, nccl on CUDA), quantizing shards, `parallelize_module`'s
  collectives, rank 0 leading and the others following.

`open_parallel` is what `torchat.model_source.open_model` calls when `source.tp > 1`. On rank 0 it returns the
OpenedModel that the verb runs; on another rank it serves rank 0's forward calls and then ends the process.
"""

import sys
from dataclasses import dataclass

from torchat.errors import TorchatError


def open_parallel(source):
    """The OpenedModel of `source` split over source.tp ranks (rank 0); a follower rank exits when rank 0 is done."""
    from torchat.model_source import OpenedModel
    from torchat.parallel.runtime import LeaderModel, follow

    rank_model = load_rank(source)
    if rank_model.rank != 0:
        follow(rank_model.text_model, rank_model.control)
        sys.exit(0)
    print(f"torchat: tensor parallel over {source.tp} ranks; {rank_model.plan.describe()}", file=sys.stderr)
    if rank_model.quant_summary:
        print(rank_model.quant_summary, file=sys.stderr)
    return OpenedModel(LeaderModel(rank_model.text_model, rank_model.control), rank_model.tokenizer,
                       rank_model.description)


@dataclass
class RankModel:
    """One rank's part of a model: its EagerModel (which runs the collectives), the control group that rank 0 leads
    with, and on rank 0 the tokenizer."""

    rank: int
    plan: object            # torchat.parallel.plan.ShardPlan
    text_model: object      # torchat.generate.EagerModel over this rank's modules
    control: object         # the gloo group of LeaderModel and follow
    tokenizer: object | None
    description: dict
    quant_summary: str | None


def load_rank(source) -> RankModel:
    """Join the process group and load this rank's slices of `source`, quantized and parallelized."""
    import torch.distributed as dist

    from torchat.checkpoint import resolve_args
    from torchat.checkpoint.sliced import open_sliced
    from torchat.dtypes import TORCH_DTYPES
    from torchat.generate import EagerModel
    from torchat.model_source import DEFAULT_MAX_SEQ_LEN, _check_device, find_tokenizer, resolve
    from torchat.parallel.plan import ShardPlan, build_local_transformer, load_local_state_dict
    from torchat.parallel.runtime import (init_tensor_parallel, parallelize, quantize_local, run_collective,
                                          silence_follower, whole_rows_for)
    from torchat.quant import parse_quant
    from torchat.vocabulary import Backend, Dtype

    if source.compile or source.compile_prefill:
        raise TorchatError(f"--tp {source.tp} runs eagerly; drop --compile/--compile-prefill")
    _check_device(source.device)
    specs = parse_quant(source.quant) if source.quant else []
    mesh, control = init_tensor_parallel(source.tp, source.device)
    rank = dist.get_rank()
    if rank != 0:
        silence_follower()
        # rank 0 fetches a catalog model first (on the control group: no time limit, a download can be long)
        run_collective(dist.barrier, group=control)
    resolved = resolve(source)
    if rank == 0:
        run_collective(dist.barrier, group=control)
    if resolved.kind != "checkpoint":
        what = "an exported artifact" if resolved.kind == "artifact" else "a baked quantized checkpoint"
        raise TorchatError(f"--tp {source.tp} splits a checkpoint as it reads it; {resolved.path} is {what}: pass "
                           "the checkpoint it was made from (with --quant)")
    sliced = open_sliced(resolved.path, resolved.format, resolve_args(source.params_table, source.params_path))
    plan = ShardPlan.for_model(sliced.args, source.tp, rank, whole_rows_for(specs))
    context = sliced.args.max_seq_len
    cache = source.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
    if cache > context:
        raise TorchatError(f"--max-seq-length {cache} is beyond the model's context of {context} tokens")
    tokenizer = None
    if rank == 0:  # only rank 0 tokenizes; it fails on a missing tokenizer before loading anything
        from torchat.tokenizers import load_tokenizer

        path = source.tokenizer_path or resolved.tokenizer_path or find_tokenizer(resolved.path, sliced.metadata)
        tokenizer = load_tokenizer(path, source.tokenizer_kind)
        if tokenizer.vocab_size > sliced.args.vocab_size:
            raise TorchatError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{sliced.args.vocab_size}; pass the model's own --tokenizer-path")
    dtype = TORCH_DTYPES[source.dtype or Dtype.FP32]
    model = build_local_transformer(plan)
    tensors = {name: sliced.read(name, part, dtype) for name, part in plan.slices().items()}
    model = load_local_state_dict(model, plan, tensors, source.device)
    del tensors, sliced
    summary = quantize_local(model, specs, plan) if specs else None
    parallelize(model, plan, mesh)
    description = {"label": resolved.label, "backend": str(Backend.EAGER), "kind": resolved.kind, "compile": False,
                   "dtype": str(source.dtype or Dtype.FP32), "quant": [s.to_dict() for s in specs],
                   "source": str(resolved.path), "model_args": plan.args.to_dict(), "path": str(resolved.path),
                   "tp": source.tp}
    return RankModel(rank, plan, EagerModel(model, cache), control, tokenizer, description, summary)
