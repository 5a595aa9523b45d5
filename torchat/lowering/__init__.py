"""Lowering: a (possibly quantized) Transformer exported once, compiled by a backend, checked, then published.

    LOWERINGS[suffix] -> Lowering(backend, lower(programs, metadata, output), attention, methods)
    export_model(model, Path("m.pte"), max_seq_len=..., dtype="fp32") -> ExportReport

One exported forward serves prefill and decode: tokens (1, S) at positions (S,) with S dynamic in 1..max_seq_len,
the static KV cache as mutable buffers inside the artifact. A .pte holds it twice on one cache, as forward (every
position's logits) and forward_last (the last position's: generation's prefill skips the output layer for the
others; torchat.exported.FORWARD_METHODS). Every export ends with a logits check against the
eager model (prefill + 2 decode steps); a mismatch fails the export and nothing is published. The artifact is
built under a temporary name beside the output and renamed into place (torchat.publish). Which dtypes and devices a
backend takes is torchat.vocabulary's.
"""

import functools
import hashlib
import importlib.metadata
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.export import Dim, ExportedProgram

from torchat.errors import TorchatError, unknown_key_error
from torchat.exported import FORWARD_METHODS, ArtifactMetadata
from torchat.lowering.parity import TOLERANCES, ParityReport, Tolerance, check_parity
from torchat.model import Transformer
from torchat.publish import publish_file
from torchat.vocabulary import ARTIFACT_SUFFIXES, BACKENDS, Backend, Device, Dtype

TOOLCHAIN = ("torch", "torchao", "executorch")


@dataclass(frozen=True)
class Lowering:
    backend: Backend
    # (method name -> its exported program, metadata, output path): writes the artifact
    lower: Callable[[dict[str, ExportedProgram], ArtifactMetadata, Path], None]
    # model (caches set up) -> a context manager that adapts its caches and attention to the backend for the export
    attention: Callable | None = None
    # model -> the dtype of the artifact's KV cache where it differs from the model's (the parity check's eager
    # reference keeps the same one, so that it compares the lowering, not fp16's rounding of keys and values)
    cache_dtype: Callable | None = None
    # the forward methods it builds (torchat.exported.FORWARD_METHODS)
    methods: tuple[str, ...] = ("forward",)

    @property
    def dtypes(self) -> tuple[Dtype, ...]:
        return BACKENDS[self.backend].dtypes

    @property
    def devices(self) -> tuple[Device, ...]:
        return BACKENDS[self.backend].devices


def _lazy(module: str, function: str):
    def call(*args):
        return getattr(importlib.import_module(module), function)(*args)
    return call


# artifact suffix -> how it is built; the suffix's backend (vocabulary.ARTIFACT_SUFFIXES) says what it takes
LOWERINGS = {
    ".pt2": Lowering(ARTIFACT_SUFFIXES[".pt2"], _lazy("torchat.lowering.aoti", "lower_aoti_package"),
                     attention=_lazy("torchat.lowering.fusion", "kernel_layers")),
    ".so": Lowering(ARTIFACT_SUFFIXES[".so"], _lazy("torchat.lowering.aoti", "lower_aoti_dso"),
                    attention=_lazy("torchat.lowering.fusion", "kernel_layers")),
    ".pte": Lowering(ARTIFACT_SUFFIXES[".pte"], _lazy("torchat.lowering.et", "lower_et"),
                     attention=_lazy("torchat.lowering.et", "llm_attention"),
                     cache_dtype=_lazy("torchat.lowering.et", "cache_dtype"), methods=tuple(FORWARD_METHODS)),
}


@dataclass
class ExportReport:
    path: Path
    metadata: ArtifactMetadata
    parity: ParityReport
    export_seconds: float   # torch.export + backend compile/lowering
    check_seconds: float
    size_bytes: int
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"exported {self.path} ({self.metadata.backend}, {self.metadata.dtype}, "
                f"{_quant_label(self.metadata.quant)}, max_seq_len {self.metadata.max_seq_len}): "
                f"{self.size_bytes / 2**20:.1f} MiB in {self.export_seconds:.1f} s; {self.parity.summary()}")


def lowering_for(output: Path) -> Lowering:
    suffix = Path(output).suffix
    if suffix not in LOWERINGS:
        raise unknown_key_error("artifact suffix (output path extension)", suffix, LOWERINGS)
    return LOWERINGS[suffix]


def check_supported(lowering: Lowering, dtype: str, device: str, quant_specs: list) -> None:
    """Refuse what the backend cannot run correctly, before spending minutes lowering it."""
    if dtype not in lowering.dtypes:
        raise TorchatError(f"backend {lowering.backend} does not take --dtype {dtype}; choose one of: "
                           f"{', '.join(lowering.dtypes)}")
    if device not in lowering.devices:
        raise TorchatError(f"backend {lowering.backend} does not run on --device {device}; choose one of: "
                           f"{', '.join(lowering.devices)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TorchatError("--device cuda, but torch sees no CUDA device; export for --device cpu")
    if quant_specs:
        from torchat.quant import backend_support

        backend_support(quant_specs, lowering.backend)


def export_forward(model: Transformer, max_seq_len: int, attention: Callable | None = None,
                   last_only: bool = False) -> ExportedProgram:
    """The forward with a dynamic sequence length 1..max_seq_len and the KV cache as mutable buffers.

    attention: a backend's model -> context manager that swaps in its own cache and attention. last_only: the
    program returns the last position's logits only (the model's buffers keep their names, so that two programs of
    one model can share their caches).
    The example prompt has S=2: an example of S=1 would specialize the dimension (0/1 specialization), and the
    tokens and the positions must share one Dim for the index_put into the cache to stay dynamic.
    """
    model.setup_caches(1, max_seq_len)
    device = next(model.parameters()).device
    seq = Dim("seq", min=1, max=max_seq_len)
    example = (torch.zeros(1, 2, dtype=torch.long, device=device), torch.arange(2, device=device))
    # under no_grad: ExecuTorch rejects an in-place cache write into a leaf that requires grad
    # last_only as a constant of the trace, not an input of the program
    model.forward = functools.partial(type(model).forward, model, last_only=last_only)
    try:
        with torch.no_grad(), (attention or _model_attention)(model):
            return torch.export.export(model, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    finally:
        del model.forward


@contextmanager
def _model_attention(model: Transformer):
    """The model's own cache and attention (over the filled slots: a data-dependent length the export bounds)."""
    yield model


def export_model(model: Transformer, output: Path, *, max_seq_len: int, dtype: str, device: str = "cpu",
                 quant: list | None = None, quant_specs: list | None = None, tokenizer=None,
                 tokenizer_file: str | None = None, tolerance: Tolerance | None = None) -> ExportReport:
    """Export `model` to `output` (its suffix picks the backend), check it against eager, publish it.

    quant: the quant specs as JSON-able dicts (recorded); quant_specs: the parsed specs (checked against the
    backend). The model must already be quantized and in `dtype` on `device`.
    """
    output = Path(output)
    lowering = lowering_for(output)
    check_supported(lowering, dtype, device, quant_specs or [])
    if not 2 <= max_seq_len <= model.args.max_seq_len:
        raise TorchatError(f"--max-seq-length {max_seq_len}: must be between 2 and the model's context of "
                           f"{model.args.max_seq_len}")
    if not output.parent.is_dir():
        raise TorchatError(f"{output.parent}: no such directory for the output")
    metadata = ArtifactMetadata(
        backend=str(lowering.backend), model_args=model.args.to_dict(), max_seq_len=max_seq_len, dtype=dtype,
        device=device, quant=list(quant or []), tokenizer_kind=getattr(tokenizer, "kind", None),
        tokenizer_file=tokenizer_file, bos_id=getattr(tokenizer, "bos_id", None),
        eos_id=getattr(tokenizer, "eos_id", None), toolchain=toolchain_versions())
    metadata = _with_build_key(metadata, model)
    # publish_file's temporary keeps the final file name: a .pt2 archive is rooted at its file's stem
    with publish_file(output) as scratch:
        start = time.perf_counter()
        programs = {name: export_forward(model, max_seq_len, lowering.attention, FORWARD_METHODS[name])
                    for name in lowering.methods}
        exported_at = time.perf_counter()
        lowering.lower(programs, metadata, scratch)
        lowered_at = time.perf_counter()
        tolerance = tolerance or TOLERANCES[(dtype, bool(metadata.quant))]
        parity = check_parity(model, scratch, tolerance, max_seq_len,
                              lowering.cache_dtype(model) if lowering.cache_dtype else None)
        checked_at = time.perf_counter()
        if not parity.ok:
            raise TorchatError(f"{output.name}: the {lowering.backend} artifact disagrees with the eager model "
                               f"({parity.summary()}); nothing was written")
        size = scratch.stat().st_size
    return ExportReport(output, metadata, parity, lowered_at - start, checked_at - lowered_at, size,
                        {"export": exported_at - start, "lower": lowered_at - exported_at})


def toolchain_versions() -> dict:
    versions = {}
    for name in TOOLCHAIN:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes (tensor subclasses by their parts)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        inner_names, context = tensor.__tensor_flatten__()
        digest.update(f"{name}:{type(tensor).__name__}:{context}".encode())
        for inner in inner_names:
            _hash_tensor(digest, f"{name}.{inner}", getattr(tensor, inner))
        return
    plain = tensor.detach().cpu().contiguous()
    digest.update(f"{name}:{plain.dtype}:{tuple(plain.shape)}".encode())
    digest.update(plain.reshape(-1).view(torch.uint8).numpy().tobytes())


def _with_build_key(metadata: ArtifactMetadata, model: Transformer) -> ArtifactMetadata:
    spec = {k: v for k, v in json.loads(metadata.to_json()).items() if k != "build_key"}
    preimage = json.dumps({"spec": spec, "weights": weights_digest(model)}, sort_keys=True)
    values = json.loads(metadata.to_json())
    values["build_key"] = hashlib.sha256(preimage.encode()).hexdigest()
    return ArtifactMetadata(**values)


def _quant_label(quant: list) -> str:
    return json.dumps(quant) if quant else "no quant"
