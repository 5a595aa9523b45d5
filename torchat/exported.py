"""Exported artifacts (.pt2, .so, .pte) loaded behind the `TextModel` interface, and the metadata they carry.

Each artifact holds everything a loader or a C++ runner needs except the tokenizer file:
    .pt2  the AOT Inductor package; `<root>/extra/torchat.json` in the zip, and the same JSON under the key
          "torchat" of the model's AOTI metadata (`AOTIModelPackageLoader::get_metadata()` in C++)
    .so   an AOT Inductor shared library; the JSON appended after the ELF image as
          `<json bytes><u64 little-endian length><b"TORCHAT1">` (the dynamic loader ignores trailing bytes)
    .pte  an ExecuTorch program; constant methods `get_torchat_metadata` (the JSON string), `get_max_seq_len`,
          `get_vocab_size`, `get_bos_id`, `get_eos_id` (ExecuTorch-llama's names), read with `Module::execute`

The KV cache lives inside the loaded artifact and has no reset: a new generation restarts at position 0, and the
causal mask hides the stale slots beyond the current position. Positions are checked here, since the backends
fail obscurely (or read out of bounds) on a position beyond the cache.
This module never imports torchat.lowering: generate loads artifacts without the exporters.
"""

import json
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from torchat.errors import TorchatError, unknown_key_error

METADATA_VERSION = 1
PT2_METADATA_FILE = "torchat.json"  # in the package's extra/ directory
DSO_TRAILER_MAGIC = b"TORCHAT1"
PTE_METADATA_METHOD = "get_torchat_metadata"
# an artifact's forward methods -> whether it returns the last position's logits only. A .pte has both, on one KV
# cache (generation calls forward_last: a prompt's other positions skip the output layer; evaluation forward); an
# AOTI artifact, and a .pte exported before forward_last, forward alone (the loader slices its logits)
FORWARD_METHODS = {"forward": False, "forward_last": True}


@dataclass(frozen=True)
class ArtifactMetadata:
    """What an exported artifact says about itself; written by torchat.lowering, read by the loaders."""

    backend: str                      # "aoti" or "et"
    model_args: dict                  # ModelArgs.to_dict()
    max_seq_len: int                  # the KV cache length: positions 0 .. max_seq_len-1
    dtype: str                        # fp32, bf16, fp16: the model's float dtype
    device: str                       # cpu or cuda
    quant: list = field(default_factory=list)  # the quant specs as dicts; [] when not quantized
    tokenizer_kind: str | None = None
    tokenizer_file: str | None = None  # a file name looked up beside the artifact
    bos_id: int | None = None
    eos_id: int | None = None
    build_key: str = ""               # hash of the spec, the weights and the toolchain (see lowering)
    toolchain: dict = field(default_factory=dict)
    version: int = METADATA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Path) -> "ArtifactMetadata":
        try:
            values = json.loads(text)
            metadata = cls(**values)
        except (ValueError, TypeError) as error:
            raise TorchatError(f"{source}: unreadable torchat metadata ({error}); re-export the artifact") from None
        if metadata.version != METADATA_VERSION:
            raise TorchatError(f"{source}: metadata version {metadata.version}, this torchat reads "
                               f"{METADATA_VERSION}; re-export the artifact")
        return metadata

    @property
    def vocab_size(self) -> int:
        return self.model_args["vocab_size"]


# --- reading metadata --------------------------------------------------------------------------------------

def _read_pt2_metadata(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{PT2_METADATA_FILE}")]
            return archive.read(names[0]).decode()
    except (zipfile.BadZipFile, IndexError) as error:
        raise TorchatError(f"{path}: not a torchat AOTI package ({error}); export it with `torchat export "
                           "--output-aoti-package-path`") from None


def _read_dso_metadata(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        trailer = len(DSO_TRAILER_MAGIC) + 8
        if size > trailer:
            f.seek(size - trailer)
            length, magic = struct.unpack("<Q8s", f.read(trailer))
            if magic == DSO_TRAILER_MAGIC and length <= size - trailer:
                f.seek(size - trailer - length)
                return f.read(length).decode()
    raise TorchatError(f"{path}: no torchat metadata trailer; export it with `torchat export --output-dso-path`")


def _read_pte_metadata(path: Path) -> str:
    return str(_load_pte_program(path).load_method(PTE_METADATA_METHOD)(())[0])


_METADATA_READERS = {".pt2": _read_pt2_metadata, ".so": _read_dso_metadata, ".pte": _read_pte_metadata}


def read_metadata(path: Path) -> ArtifactMetadata:
    path = Path(path)
    if path.suffix not in _METADATA_READERS:
        raise unknown_key_error("artifact suffix", path.suffix, _METADATA_READERS)
    if not path.is_file():
        raise TorchatError(f"{path}: no such artifact; export one with `torchat export`")
    return ArtifactMetadata.from_json(_METADATA_READERS[path.suffix](path), path)


# --- the TextModel implementations --------------------------------------------------------------------------

class ExportedModel:
    """An artifact's forward with position checks; subclasses supply `_run(tokens, input_pos) -> logits`."""

    def __init__(self, path: Path, metadata: ArtifactMetadata, device: torch.device):
        self.path = path
        self.metadata = metadata
        self.max_seq_len = metadata.max_seq_len
        self.device = device

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        seq = tokens.shape[1]
        if tokens.shape[0] != 1 or input_pos.shape != (seq,):
            raise TorchatError(f"{self.path.name}: needs tokens (1, seq) and input_pos (seq,), got "
                               f"{tuple(tokens.shape)} and {tuple(input_pos.shape)}")
        if seq == 0 or int(input_pos.min()) < 0 or int(input_pos.max()) >= self.max_seq_len:
            raise TorchatError(f"{self.path.name}: positions {int(input_pos.min())}..{int(input_pos.max())} "
                               f"outside its KV cache of {self.max_seq_len}; re-export with a larger "
                               "--max-seq-length")
        tokens = tokens.to(device=self.device, dtype=torch.long)
        input_pos = input_pos.to(device=self.device, dtype=torch.long)
        logits = self._run(tokens, input_pos, last_only)
        return logits[:, -1:] if last_only else logits

    def _run(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool) -> torch.Tensor:
        """The logits: every position's, or where the artifact has a method for it and last_only asks, the last's."""
        raise NotImplementedError


def _load_kernels_for(metadata: ArtifactMetadata) -> None:
    """A quantized CPU artifact may call torchat's linear ops (8da4w, 8da8w: torchat/kernels/torch_linear.cpp),
    which AOTI's proxy executor finds in torch's dispatcher: registered before the artifact loads."""
    if metadata.device == "cpu" and metadata.quant:
        from torchat.kernels import load_torch_kernels

        load_torch_kernels()


class AOTIPackageModel(ExportedModel):
    def __init__(self, path: Path, metadata: ArtifactMetadata):
        device = _artifact_device(path, metadata)
        super().__init__(path, metadata, device)
        _load_kernels_for(metadata)
        index = device.index if device.index is not None else -1
        self._runner = torch._inductor.aoti_load_package(str(path), device_index=index)

    @torch.inference_mode()
    def _run(self, tokens, input_pos, last_only):
        return self._runner(tokens, input_pos)


class AOTIDsoModel(ExportedModel):
    def __init__(self, path: Path, metadata: ArtifactMetadata):
        device = _artifact_device(path, metadata)
        super().__init__(path, metadata, device)
        _load_kernels_for(metadata)
        if device.type == "cuda":
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, str(device))
        else:
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)

    @torch.inference_mode()
    def _run(self, tokens, input_pos, last_only):
        return self._runner.run([tokens, input_pos])[0]


class ExecuTorchModel(ExportedModel):
    def __init__(self, path: Path, metadata: ArtifactMetadata):
        super().__init__(path, metadata, torch.device("cpu"))
        # the pybindings' Program API: its methods share their memory arenas, so forward and forward_last write one
        # KV cache (their Module API gives each method its own)
        self._program = _load_pte_program(path)
        names = {self._program.get_method_name(i) for i in range(self._program.num_methods())}
        self._methods = {last: self._program.load_method(name) for name, last in FORWARD_METHODS.items()
                         if name in names}

    def _run(self, tokens, input_pos, last_only):
        return self._methods.get(last_only, self._methods[False])((tokens, input_pos))[0]


def _artifact_device(path: Path, metadata: ArtifactMetadata) -> torch.device:
    device = torch.device(metadata.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TorchatError(f"{path}: built for CUDA, but torch sees no CUDA device; export it for --device cpu")
    return device


def load_llm_ops() -> None:
    """For exporting: ExecuTorch's llama:: ops with their export forms (the wheel's custom_ops module, which imports
    Inductor), and every kernel a .pte calls, so that an exported program can run in the same process."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401

    from torchat.kernels import load_pte_runtime

    load_pte_runtime()


def _load_pte_program(path: Path):
    # the runtime and the kernel libraries only: running needs none of the export forms load_llm_ops registers
    from torchat.kernels import load_pte_runtime

    runtime = load_pte_runtime()
    try:
        return runtime._load_program(str(path))
    except RuntimeError as error:
        raise TorchatError(f"{path}: ExecuTorch cannot load it ({error}); re-export it with this torchat") from None


LOADERS = {".pt2": AOTIPackageModel, ".so": AOTIDsoModel, ".pte": ExecuTorchModel}


def load_exported(path: Path) -> ExportedModel:
    """The artifact at `path` as a TextModel, its `metadata` read from the artifact itself."""
    path = Path(path)
    if path.suffix not in LOADERS:
        raise unknown_key_error("artifact suffix", path.suffix, LOADERS)
    metadata = read_metadata(path)
    return LOADERS[path.suffix](path, metadata)


def artifact_tokenizer_path(path: Path, metadata: ArtifactMetadata) -> Path:
    """The tokenizer file the artifact names, beside it."""
    if metadata.tokenizer_file and (Path(path).parent / metadata.tokenizer_file).is_file():
        return Path(path).parent / metadata.tokenizer_file
    named = f"its tokenizer {metadata.tokenizer_file!r} is not beside it" if metadata.tokenizer_file else \
        "it names no tokenizer"
    raise TorchatError(f"{path}: {named}; pass --tokenizer-path")
