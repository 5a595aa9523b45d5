"""Opening a model over N ranks, and running it: rank 0 leads, the others follow.

Every rank loads its own slices (torchat.parallel.plan, torchat.checkpoint.sliced), quantizes them, and
`parallelize_module` installs the collectives: the row-parallel projections' partial sums and the vocabulary
rows' embedding lookups are `Partial` DTensors redistributed to `Replicate` (all-reduce), the logits' vocabulary
shards `Shard(-1)` redistributed to `Replicate` (all-gather). The weights stay plain local tensors, so every
torchat kernel (fp32, bf16, int8, int4) runs on its shard unchanged.

Only rank 0 runs the verb (generate, chat, eval, server): it reads stdin, prints, samples. Its TextModel
(`LeaderModel`) first broadcasts each forward call's tokens and positions over a control group; the other ranks
(`follow`) wait there, run the same forward call, and leave when rank 0 says stop or goes away. A collective that
waits longer than TORCHAT_TP_TIMEOUT seconds (default 300) fails: a rank that dies or hangs stops the others with a
one-line error, not a hang. The control group waits without limit (a chat waits for its user).
"""

import atexit
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from torchat.errors import TorchatError

DEFAULT_TIMEOUT_S = 300
# the quant schemes whose quantized shards equal the shards of the quantized whole (see check_quant)
SPLITTABLE_SCHEMES = ("embedding", "linear:hqq", "linear:int4", "linear:int8", "precision")
_STOP, _FORWARD = 0, 1


def collective_timeout() -> timedelta:
    value = os.environ.get("TORCHAT_TP_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise TorchatError(f"TORCHAT_TP_TIMEOUT={value!r} is not a positive number of seconds")
    return timedelta(seconds=seconds)


def init_tensor_parallel(tp: int, device: str):
    """Join the process group that torchrun (or torchat's own launcher) describes in the environment -> (mesh,
    control group). gloo on CPU, nccl on CUDA."""
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world == 0:
        raise TorchatError(f"--tp {tp} runs {tp} processes: start torchat plainly (it launches them) or through "
                           f"torchrun --nproc-per-node {tp}")
    if world != tp:
        raise TorchatError(f"--tp {tp}, but {world} processes were launched; launch {tp} (torchrun --nproc-per-node "
                           f"{tp}, or --nnodes x --nproc-per-node = {tp})")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=collective_timeout())
    mesh = init_device_mesh(device, (tp,), mesh_dim_names=("tp",))
    control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    return mesh, control


def whole_rows_for(specs: list) -> bool:
    """Does the quantization need wo and w2 split by output rows (torchat.parallel.plan)? int8 per channel: its CPU
    kernel (torchat.quant.int8) rounds each whole dot product to bf16, which partial sums cannot reproduce."""
    return any(s.scheme == "linear:int8" and s.options.get("group_size", 0) == 0 for s in specs)


def check_quant(specs: list, plan) -> None:
    """Refuse a scheme whose shards would not be the quantized whole's shards.

    Weight-only schemes quantize each output row on its own (int8 per channel) or in groups along the input: a
    rank's rows are whole rows; an input split is whole groups when the rank's input width is a multiple of the group
    size. The dynamic-activation schemes scale each token over its whole input, which an input split does not hold,
    and GPTQ calibrates on the whole layer."""
    widths = [] if plan.whole_rows else \
        [plan.local_hidden] + ([plan.local_heads * plan.args.head_dim] if plan.attention else [])
    for spec in specs:
        if spec.scheme not in SPLITTABLE_SCHEMES:
            raise TorchatError(f"--tp {plan.world} cannot split quantization {spec.scheme}: its scales span the "
                               f"split input dim; use one of {', '.join(SPLITTABLE_SCHEMES)}")
        group = spec.options.get("group_size", 0)
        if spec.scheme != "embedding" and group and any(w % group for w in widths):
            raise TorchatError(f"--tp {plan.world}: {spec.scheme}'s groups of {group} do not fit a rank's input "
                               f"width {min(widths)}; use a group_size that divides {', '.join(map(str, widths))}")


def quantize_local(model, specs: list, plan) -> str:
    """Quantize this rank's modules as the whole model's would be -> the report's summary."""
    from torchat.quant import quantize_model

    check_quant(specs, plan)
    with torch.no_grad():
        return quantize_model(model, specs).summary()


def parallelize(model, plan, mesh) -> None:
    """The collectives, installed by torch's tensor-parallel API on this rank's (quantized) modules."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput, PrepareModuleOutput, parallelize_module

    def summed() -> PrepareModuleOutput:
        return PrepareModuleOutput(output_layouts=Partial(), desired_output_layouts=Replicate())

    def gathered() -> PrepareModuleOutput:
        return PrepareModuleOutput(output_layouts=Shard(-1), desired_output_layouts=Replicate())

    def whole_rows() -> PrepareModuleInputOutput:  # the input all-gathered, the output rows all-gathered
        return PrepareModuleInputOutput(input_layouts=Shard(-1), desired_input_layouts=Replicate(),
                                        use_local_input=True, output_layouts=Shard(-1),
                                        desired_output_layouts=Replicate())

    styles = {name: whole_rows() if plan.whole_rows else summed() for name in plan.row_parallel()}
    if plan.vocab:
        styles["tok_embeddings"] = summed()
        styles["output"] = gathered()
    parallelize_module(model, mesh, styles)


class LeaderModel:
    """Rank 0's TextModel: each call is first sent to the followers, then run here."""

    def __init__(self, inner, control):
        self.inner, self.control, self.device = inner, control, inner.device
        self.closed = False
        atexit.register(self.close)

    @property
    def max_seq_len(self) -> int:
        return self.inner.max_seq_len

    def _send(self, command: int, tokens: torch.Tensor | None = None, input_pos: torch.Tensor | None = None) -> None:
        # one broadcast for a decode step: [command, seq, token, position]; a longer call sends its ids after
        seq = 0 if tokens is None else tokens.shape[1]
        header = torch.tensor([command, seq, 0, 0], dtype=torch.long)
        if seq == 1:
            header[2], header[3] = int(tokens[0, 0]), int(input_pos[0])
        run_collective(dist.broadcast, header, 0, group=self.control)
        if seq > 1:
            run_collective(dist.broadcast, torch.cat([tokens[0].cpu(), input_pos.cpu()]), 0, group=self.control)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        self._send(_FORWARD, tokens, input_pos)
        # every rank runs the same graph (the followers know no last_only): the slice is rank 0's own
        logits = run_collective(self.inner.forward, tokens, input_pos)
        return logits[:, -1:] if last_only else logits

    def close(self) -> None:
        """Tell the followers to leave (at exit, also after an error)."""
        if not self.closed:
            self.closed = True
            try:
                self._send(_STOP)
            except TorchatError:
                pass  # the followers are gone already


def follow(text_model, control) -> None:
    """A follower rank's loop: run each forward call rank 0 sends, until it says stop."""
    device = text_model.device
    while True:
        header = torch.empty(4, dtype=torch.long)
        run_collective(dist.broadcast, header, 0, group=control)
        command, seq = int(header[0]), int(header[1])
        if command == _STOP:
            return
        if seq == 1:
            tokens, input_pos = header[2:3].view(1, 1), header[3:4]
        else:
            ids = torch.empty(2 * seq, dtype=torch.long)
            run_collective(dist.broadcast, ids, 0, group=control)
            tokens, input_pos = ids[:seq].view(1, seq), ids[seq:]
        run_collective(text_model.forward, tokens.to(device), input_pos.to(device))


def run_collective(call, *args, **kwargs):
    """A call that runs collectives: a failed or timed-out one is one line naming the likely cause."""
    try:
        return call(*args, **kwargs)
    except (RuntimeError, dist.DistError) as error:
        if isinstance(error, RuntimeError) and not isinstance(error, dist.DistError) and \
                not any(word in str(error).lower() for word in ("gloo", "nccl", "connection", "timed out", "timeout")):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TorchatError(f"rank {rank}: a collective failed ({first[:200]}); another rank died or waited longer "
                           f"than TORCHAT_TP_TIMEOUT ({collective_timeout().total_seconds():.0f} s)") from None


def silence_follower() -> None:
    """A follower prints nothing on stdout, reads no stdin and ignores Ctrl-C: rank 0 does all three, and tells the
    followers when to leave."""
    sys.stdout = open(os.devnull, "w")
    sys.stdin = open(os.devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
