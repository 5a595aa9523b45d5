"""One way to open any model: a `ModelSource` says what to run, `open_model` opens it.

    open_model(ModelSource("smollm2-135m-int4-aoti"))          -> OpenedModel(text_model, tokenizer, description)
    open_model(ModelSource("q/", quant=None, dtype=None))      a baked quantized checkpoint
    open_model(ModelSource(checkpoint=Path("m.gguf"), quant='{"linear:int4": {"group_size": 32}}'))

What a source may name (`model`, or the one path flag in `checkpoint`), in the order they are tried:
- a path: a `.pt2`, `.so` or `.pte` (an exported artifact), a directory baked by `torchat quantize` (quant.json),
  or a checkpoint file or directory of any format torchat reads (GGUF, Hugging Face, Meta, llama2.c, torchat);
- a catalog model key (targets/models.toml): its files are fetched (verified) into the cache;
- a build target name MODEL-QUANT[-DTYPE]-BACKEND: its artifact from the store (built first with `build=True`);
- nothing: the default model, SmolLM2-135M-Instruct from its GGUF.

Every verb (generate, chat, eval, bench, export, quantize, server) opens its model here; nothing below the CLI
sees argparse. `open_transformer` gives the eager Transformer itself (export and quantize need it).
"""

import importlib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torchat.errors import TorchatError
from torchat.vocabulary import ARTIFACT_SUFFIXES, BACKENDS, DEFAULT_MAX_SEQ_LEN, Backend, Device, Dtype

DEFAULT_MODEL_ASSET = "smollm2-135m-gguf"
TOKENIZER_NAMES = ("tokenizer.gguf", "tokenizer.json", "tokenizer.model", "original/tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """What to run and how. `model` and `checkpoint` are alternatives (see the module docstring)."""

    model: str | None = None            # a path, a catalog model key or a build target name
    checkpoint: Path | None = None      # a path named by a flag (--checkpoint-path, --gguf-path, --pte-path, ...)
    format: str | None = None           # the checkpoint format, detected when None
    params_table: str | None = None
    params_path: Path | None = None
    tokenizer_path: Path | None = None  # found beside the checkpoint or named by the artifact when None
    tokenizer_kind: str | None = None
    dtype: Dtype | None = None          # None: what the source holds (fp32 for a float checkpoint)
    device: Device = Device.CPU
    quant: str | None = None            # quantization JSON (or a file holding it), applied to an eager model
    max_seq_len: int | None = None      # the KV cache; None: the artifact's own, or DEFAULT_MAX_SEQ_LEN eager
    compile: bool = False
    compile_prefill: bool = False
    allow_unpinned: bool = False        # fetch a catalog model's files with no pinned sha256
    build: bool = False                 # build a target that the store does not hold yet
    tp: int = 1                         # tensor-parallel ranks: the model split over tp processes (torchat.parallel)

    def to_dict(self) -> dict:
        """JSON-able (for a child process: bench)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSource":
        paths = ("checkpoint", "params_path", "tokenizer_path")
        return cls(**{k: (Path(v) if k in paths and v is not None else v) for k, v in values.items()})


@dataclass
class Resolved:
    """A source resolved to files: `kind` is artifact, baked or checkpoint."""

    kind: str
    path: Path
    format: str | None = None
    label: str = ""                     # what tables call it (the target's or the file's name)
    tokenizer_path: Path | None = None  # a build target's converted checkpoint's tokenizer


@dataclass
class OpenedModel:
    """A model ready to generate with: its TextModel, its tokenizer and what it is (for tables and labels)."""

    text_model: object   # torchat.generate.TextModel
    tokenizer: object    # torchat.tokenizers.Tokenizer
    description: dict = field(default_factory=dict)


@dataclass
class EagerParts:
    """An eager model before it gets its cache: the Transformer, its tokenizer, and where they came from."""

    model: object                  # torchat.model.Transformer, quantized as the source asks
    tokenizer: object | None
    tokenizer_path: Path | None
    quant: list[dict]              # the applied (or baked) quant specs
    resolved: Resolved
    metadata: dict = field(default_factory=dict)


# --- resolving names to files ----------------------------------------------------------------------------------

def resolve(source: ModelSource) -> Resolved:
    """The files a source names; fetches a catalog model, and builds a target when `source.build`."""
    if source.model is not None and source.checkpoint is not None:
        raise TorchatError(f"name the model once: {source.model!r} and {source.checkpoint} both name one")
    if source.checkpoint is not None:
        return _resolve_path(Path(source.checkpoint), source)
    if source.model is None:
        from torchat.assets import fetch_asset

        print("torchat: no model named; using the default model SmolLM2-135M-Instruct", file=sys.stderr)
        return _resolve_path(fetch_asset(DEFAULT_MODEL_ASSET), source)
    name = source.model
    if Path(name).exists():
        return _resolve_path(Path(name), source)
    from torchat.spec import load_catalog

    catalog = load_catalog()
    if name in catalog.models:
        return _resolve_catalog_model(catalog.models[name], source)
    if "/" in name or Path(name).suffix in ARTIFACT_SUFFIXES:
        raise TorchatError(f"{name}: no such file or directory")
    try:
        catalog.parse_target(name)
    except TorchatError as error:
        raise TorchatError(f"{name!r} is neither a file, a model ({', '.join(sorted(catalog.models))}) nor a build "
                           f"target MODEL-QUANT[-DTYPE]-BACKEND ({error}); see `torchat list`") from None
    return _resolve_target(catalog, name, source)


def _resolve_path(path: Path, source: ModelSource) -> Resolved:
    if not path.exists():
        raise TorchatError(f"{path}: no such file or directory")
    if path.suffix in ARTIFACT_SUFFIXES and path.is_file():
        return Resolved("artifact", path, label=path.name)
    from torchat.quant.checkpoint import QUANT_MANIFEST  # torch-free constant

    if path.is_dir() and (path / QUANT_MANIFEST).is_file():
        return Resolved("baked", path, label=path.name)
    return Resolved("checkpoint", path, source.format, label=path.name)


def _resolve_catalog_model(model, source: ModelSource) -> Resolved:
    """A catalog model's files, fetched (verified) into the cache; its format fills an unset --format."""
    from torchat.sources import cache_dir, fetch_model_files

    directory = cache_dir() / "models" / model.key
    fetch_model_files(model, directory, allow_unpinned=source.allow_unpinned)
    first = directory / model.files[0].name
    path = first if len(model.files) == 1 and model.format in ("gguf", "llama2c") else directory
    return Resolved("checkpoint", path, source.format or str(model.format), label=model.key)


def _resolve_target(catalog, name: str, source: ModelSource) -> Resolved:
    """A build target's artifact in the store: the backend's file, or the quantized checkpoint for eager."""
    from torchat import store
    from torchat.spec import Step

    node = catalog.node_for(Step.BUILD, name)
    found = store.find(node)
    if found is None and source.build:
        print(f"torchat: building {node.task} (as `doit {node.task}` would)", file=sys.stderr)
        found = store.realize_with_inputs(node)
    if found is None:
        raise TorchatError(f"{name} is not built yet; run `doit build:{name}` first, or pass --build")
    directory, _ = found
    target = catalog.parse_target(name)
    output = BACKENDS[target.backend].output
    if output is None:
        return Resolved("baked", directory, label=target.name)
    return Resolved("artifact", directory / output, label=target.name)


# --- opening ---------------------------------------------------------------------------------------------------

def find_tokenizer(checkpoint: Path, metadata: dict | None = None) -> Path:
    """The tokenizer beside a checkpoint: the GGUF file itself, or a known file name in its directory (a directory
    converted from a GGUF keeps the GGUF's metadata but its vocabulary in tokenizer.gguf)."""
    if checkpoint.is_file() and ((metadata or {}).get("format") == "gguf" or checkpoint.suffix == ".gguf"):
        return checkpoint
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for name in TOKENIZER_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise TorchatError(f"no tokenizer found beside {checkpoint} (looked for {', '.join(TOKENIZER_NAMES[:3])}); "
                       "pass --tokenizer-path")


def _check_device(device: str) -> None:
    import torch

    if device == Device.CUDA and not torch.cuda.is_available():
        raise TorchatError("--device cuda, but torch sees no CUDA device; use --device cpu")


def planned_quant(source: ModelSource, resolved: Resolved) -> tuple[list, str]:
    """(quant specs, dtype name) that opening will give, known before loading anything: a backend refuses what it
    cannot run before minutes of work."""
    from torchat.quant import QuantSpec, parse_quant

    if resolved.kind == "baked":
        from torchat.quant.checkpoint import read_manifest

        manifest = read_manifest(resolved.path)
        return [QuantSpec(s["scheme"], s["options"]) for s in manifest["specs"]], source.dtype or manifest["dtype"]
    return (parse_quant(source.quant) if source.quant else []), source.dtype or Dtype.FP32


def open_transformer(source: ModelSource, *, need_tokenizer: bool = True,
                     resolved: Resolved | None = None) -> EagerParts:
    """The eager Transformer a source names, quantized by `source.quant` (or as baked), in its dtype."""
    resolved = resolved or resolve(source)
    if resolved.kind == "artifact":
        raise TorchatError(f"{resolved.path} is already exported; this needs a checkpoint (the model it was "
                           "exported from)")
    return _open_eager(source, resolved, need_tokenizer)


def _open_eager(source: ModelSource, resolved: Resolved, need_tokenizer: bool) -> EagerParts:
    import torch

    from torchat.dtypes import TORCH_DTYPES
    from torchat.tokenizers import load_tokenizer

    _check_device(source.device)
    path = resolved.path
    if resolved.kind == "baked":
        from torchat.quant.checkpoint import load_quantized, read_manifest

        if source.quant:
            raise TorchatError(f"{path} is already quantized (quant.json); drop --quant")
        manifest = read_manifest(path)
        if source.dtype is not None and source.dtype != manifest["dtype"]:
            raise TorchatError(f"{path} holds a {manifest['dtype']} model but --dtype is {source.dtype}; pass "
                               f"--dtype {manifest['dtype']} (or quantize again in {source.dtype})")
        model = load_quantized(path, source.device)
        quant, metadata = manifest["specs"], {}
    else:
        from torchat.checkpoint import build_model, read_checkpoint, resolve_args

        checkpoint = read_checkpoint(path, resolved.format, resolve_args(source.params_table, source.params_path))
        model = build_model(checkpoint, TORCH_DTYPES[source.dtype or Dtype.FP32], source.device)
        quant, metadata = [], checkpoint.metadata
    tokenizer, tokenizer_path = None, source.tokenizer_path
    try:
        tokenizer_path = tokenizer_path or resolved.tokenizer_path or find_tokenizer(path, metadata)
    except TorchatError:
        if need_tokenizer:
            raise
        tokenizer_path = None
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path, source.tokenizer_kind)
        if tokenizer.vocab_size > model.args.vocab_size:
            raise TorchatError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{model.args.vocab_size}; pass the model's own --tokenizer-path")
    if source.quant:
        from torchat.quant import parse_quant, quantize_model

        specs = parse_quant(source.quant)
        with torch.no_grad():
            print(quantize_model(model, specs, tokenizer).summary(), file=sys.stderr)
        quant = [spec.to_dict() for spec in specs]
    return EagerParts(model, tokenizer, tokenizer_path, quant, resolved, metadata)


def open_model(source: ModelSource) -> OpenedModel:
    """The TextModel, tokenizer and description of whatever the source names (see the module docstring)."""
    if source.tp > 1:
        # imported by name, as the CLI imports its verbs: only generate, chat, eval and server take --tp, and the
        # build graph's steps never pass it, so torchat.parallel is no part of their code keys (tests/test_layering)
        return importlib.import_module("torchat.parallel").open_parallel(source)
    resolved = resolve(source)
    if resolved.kind == "artifact":
        return _open_artifact(source, resolved)
    from torchat.generate import EagerModel

    parts = _open_eager(source, resolved, need_tokenizer=True)
    context = parts.model.args.max_seq_len
    cache = source.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
    if cache > context:
        raise TorchatError(f"--max-seq-length {cache} is beyond the model's context of {context} tokens")
    text_model = EagerModel(parts.model, cache, compile=source.compile, compile_prefill=source.compile_prefill)
    from torchat.dtypes import dtype_of

    dtype = str(dtype_of(parts.model.norm.weight.dtype))
    description = {"label": resolved.label, "backend": str(Backend.EAGER), "kind": resolved.kind,
                   "compile": source.compile, "dtype": dtype, "quant": parts.quant, "source": str(resolved.path),
                   "model_args": parts.model.args.to_dict(), "path": str(resolved.path)}
    return OpenedModel(text_model, parts.tokenizer, description)


def _open_artifact(source: ModelSource, resolved: Resolved) -> OpenedModel:
    """An exported artifact: its KV cache length and tokenizer come from its metadata."""
    from torchat.exported import artifact_tokenizer_path, load_exported
    from torchat.tokenizers import load_tokenizer

    path = resolved.path
    if source.quant or source.compile or source.compile_prefill:
        raise TorchatError(f"{path} is already exported; --quant and --compile apply to checkpoints")
    model = load_exported(path)
    metadata = model.metadata
    if source.dtype is not None and source.dtype != metadata.dtype:
        raise TorchatError(f"{path} was exported in {metadata.dtype}, not {source.dtype}; drop --dtype or export "
                           f"it again with --dtype {source.dtype}")
    if source.max_seq_len and source.max_seq_len > metadata.max_seq_len:
        raise TorchatError(f"--max-seq-length {source.max_seq_len}: {path} was exported with a KV cache of "
                           f"{metadata.max_seq_len}; re-export it with a larger --max-seq-length")
    tokenizer_path = source.tokenizer_path or artifact_tokenizer_path(path, metadata)
    tokenizer = load_tokenizer(tokenizer_path, source.tokenizer_kind or (None if source.tokenizer_path else
                                                                         metadata.tokenizer_kind))
    if tokenizer.vocab_size > metadata.vocab_size:
        raise TorchatError(f"the tokenizer has {tokenizer.vocab_size} tokens but {path.name} only "
                           f"{metadata.vocab_size}; pass the model's own --tokenizer-path")
    quant = ", ".join(str(q) for q in metadata.quant) or "no quant"
    print(f"torchat: loaded {path} ({metadata.backend}, {metadata.dtype}, {metadata.max_seq_len} positions, "
          f"{quant})", file=sys.stderr)
    description = {"label": resolved.label, "backend": metadata.backend, "kind": resolved.kind,
                   "format": path.suffix, "dtype": metadata.dtype, "quant": metadata.quant, "source": str(path),
                   "build_key": metadata.build_key, "model_args": metadata.model_args,
                   "max_seq_len": metadata.max_seq_len, "path": str(path)}
    return OpenedModel(model, tokenizer, description)
