"""A baked quantized checkpoint: bake (float checkpoint -> quantized tensors, once, offline) and load (swap
modules, load the baked tensors, pack for the device; nothing is quantized again).

The directory: model.safetensors (the plain quantized form: 4-bit codes two to a byte, int8 codes, scales,
zeros, and the float tensors left as they were), model_args.json, metadata.json, quant.json (the manifest: the
specs, the dtype, each quantized module's kind and shape, the report), and the source's tokenizer files.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from torchat.dtypes import torch_dtype
from torchat.errors import TorchatError, unknown_key_error
from torchat.model import ModelArgs, Transformer, rope_frequencies
from torchat.quant.asym4 import Int8DynActAsymInt4Linear
from torchat.quant.base import QuantizedModule
from torchat.quant.int4 import Int4WeightOnlyLinear
from torchat.quant.int8 import Int8WeightOnlyLinear
from torchat.quant.intx import Int8DynActInt4Linear, Int8DynActInt8Linear, QuantizedEmbedding
from torchat.quant.quantizer import QuantReport, quantize_model
from torchat.publish import publish_dir
from torchat.quant.spec import QuantSpec

QUANT_MANIFEST, WEIGHTS, ARGS, METADATA = "quant.json", "model.safetensors", "model_args.json", "metadata.json"
MANIFEST_VERSION = 1

MODULE_KINDS: dict[str, type[QuantizedModule]] = {
    cls.kind: cls for cls in (Int4WeightOnlyLinear, Int8WeightOnlyLinear, Int8DynActInt4Linear, Int8DynActInt8Linear,
                              Int8DynActAsymInt4Linear, QuantizedEmbedding)}


def is_quantized_dir(path: Path) -> bool:
    """Whether `path` is a directory baked by bake_quantized (load it with load_quantized)."""
    return Path(path).is_dir() and (Path(path) / QUANT_MANIFEST).is_file()


def bake_quantized(checkpoint_dir: Path, specs: list[QuantSpec], dtype: str, output_dir: Path,
                   tokenizer_path: Path | None = None, calibration_tokens: torch.Tensor | None = None) -> Path:
    """Quantize the checkpoint in `checkpoint_dir` (canonical, or any format read_checkpoint reads) in `dtype`
    and publish the quantized checkpoint at `output_dir` (built in a temp dir, then renamed into place).

    linear:gptq calibrates on `calibration_tokens` (samples, seq) if given, else on the calibration split of the
    English text encoded by the tokenizer at `tokenizer_path`, or the one in checkpoint_dir.
    """
    from torchat.checkpoint import build_model, read_checkpoint

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    model_dtype = torch_dtype(dtype)  # an unknown name lists the valid ones before any reading
    checkpoint = read_checkpoint(checkpoint_dir)
    model = build_model(checkpoint, model_dtype)
    calibration = calibration_tokens
    if calibration is None and any(spec.scheme == "linear:gptq" for spec in specs):
        from torchat.tokenizers import load_tokenizer

        calibration = load_tokenizer(tokenizer_path or checkpoint_dir)
    with torch.no_grad():
        report = quantize_model(model, specs, calibration, pack=False)
    state_dict, manifest = quantized_state(model, specs, report.to_dict())
    manifest["source"] = checkpoint_dir.name  # a name, not a path: the bytes must not depend on where it lies
    metadata = {**checkpoint.metadata, "format": "torchat", "quant": [s.to_dict() for s in specs],
                "dtype": report.dtype}

    with publish_dir(output_dir) as tmp:
        save_file(state_dict, tmp / WEIGHTS)
        (tmp / ARGS).write_text(json.dumps(checkpoint.args.to_dict(), indent=2) + "\n")
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        source_dir = checkpoint_dir if checkpoint_dir.is_dir() else checkpoint_dir.parent
        tokenizer_files = [Path(tokenizer_path)] if tokenizer_path else sorted(source_dir.glob("tokenizer*"))
        for path in tokenizer_files:
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        if not tokenizer_path and checkpoint_dir.is_file() and checkpoint.metadata.get("format") == "gguf":
            from torchat.convert import write_tokenizer_gguf

            write_tokenizer_gguf(checkpoint_dir, tmp / "tokenizer.gguf")  # a GGUF's vocabulary, not its tensors
    return output_dir


def quantized_state(model: Transformer, specs: list[QuantSpec], report: dict) -> tuple[dict, dict]:
    """(tensors to save, manifest) of a model quantized with pack=False."""
    # still tied only if neither side was quantized (quantizing one side unties them)
    tied = (type(model.output) is torch.nn.Linear and type(model.tok_embeddings) is torch.nn.Embedding
            and model.output.weight is model.tok_embeddings.weight)
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            assert not module.packed, f"{name} is packed; bake from a model quantized with pack=False"
            modules[name] = {"kind": module.kind, "config": module.config()}
    state_dict = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
                  if not (tied and name == "output.weight")}
    manifest = {"version": MANIFEST_VERSION, "specs": [s.to_dict() for s in specs], "dtype": report["dtype"],
                "tied_embeddings": tied, "modules": modules, "report": report,
                "versions": {"torch": torch.__version__, "torchao": _torchao_version()}}
    return state_dict, manifest


def _torchao_version() -> str:
    from importlib.metadata import version

    return version("torchao")


def read_manifest(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / QUANT_MANIFEST
    if not path.is_file():
        raise TorchatError(f"{path}: missing; {checkpoint_dir} is not a quantized checkpoint (bake one with "
                           "`torchat quantize`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TorchatError(f"{path}: not valid JSON ({error}); bake the checkpoint again") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise TorchatError(f"{path}: manifest version {manifest.get('version')!r}, this torchat reads "
                           f"{MANIFEST_VERSION}; bake the checkpoint again")
    return manifest


def read_report(checkpoint_dir: Path) -> QuantReport:
    """The report a baked directory's quant.json holds."""
    return QuantReport.from_dict(read_manifest(checkpoint_dir)["report"])


def load_quantized(checkpoint_dir: Path, device="cpu") -> Transformer:
    """The quantized Transformer of a baked directory on `device`, packed for it, in eval mode."""
    checkpoint_dir = Path(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    args = ModelArgs.from_json(checkpoint_dir / ARGS)
    dtype = torch_dtype(manifest["dtype"])
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        for name, entry in manifest["modules"].items():
            if entry["kind"] not in MODULE_KINDS:
                raise unknown_key_error(f"quantized module kind in {checkpoint_dir / QUANT_MANIFEST}:",
                                        entry["kind"], MODULE_KINDS)
            model.set_submodule(name, MODULE_KINDS[entry["kind"]].empty(entry["config"], dtype, "meta"))
    try:
        state_dict = load_file(checkpoint_dir / WEIGHTS, device=str(device))
    except (SafetensorError, OSError) as error:
        raise TorchatError(f"{checkpoint_dir / WEIGHTS}: unreadable ({error}); bake the checkpoint again") from None
    tied = manifest["tied_embeddings"]
    want = {name for name in model.state_dict() if not (tied and name == "output.weight")}
    missing, extra = sorted(want - set(state_dict)), sorted(set(state_dict) - want)
    if missing or extra:
        raise TorchatError(f"{checkpoint_dir / WEIGHTS}: does not match {QUANT_MANIFEST} (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); bake the checkpoint again")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    cos, sin = rope_frequencies(args, args.max_seq_len)
    # as build_model leaves them: in the model's dtype
    model.rope_cos, model.rope_sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            module.pack()
    return model.eval()
