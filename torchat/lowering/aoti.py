"""AOT Inductor: an exported forward compiled to a .pt2 package or a bare .so, with torchat's metadata inside.

The .pt2 carries the metadata twice: as `<archive root>/extra/torchat.json` (read without loading the model) and as
the model's AOTI metadata key "torchat" (what a C++ runner gets from `AOTIModelPackageLoader::get_metadata()`).
The .so carries it as a trailer after the ELF image (see torchat.exported).
"""

import shutil
import struct
import tempfile
from pathlib import Path

import torch
from torch.export import ExportedProgram

from torchat.exported import DSO_TRAILER_MAGIC, PT2_METADATA_FILE, ArtifactMetadata


def _inductor_configs(metadata: ArtifactMetadata) -> dict:
    return {"aot_inductor.metadata": {"torchat": metadata.to_json(), "max_seq_len": str(metadata.max_seq_len),
                                      "vocab_size": str(metadata.vocab_size)}}


def lower_aoti_package(program: ExportedProgram, metadata: ArtifactMetadata, output: Path) -> None:
    """Compile `program` into the AOTI package `output` (.pt2), the metadata as its extra file torchat.json."""
    from torch.export.pt2_archive._package import package_pt2

    example = program.example_inputs[0]
    options = {**_inductor_configs(metadata), "aot_inductor.package": True}
    with torch.no_grad():
        files = torch._inductor.aot_compile(program.module(), example, options=options)
    package_pt2(str(output), aoti_files={"model": files}, extra_files={PT2_METADATA_FILE: metadata.to_json()})


def lower_aoti_dso(program: ExportedProgram, metadata: ArtifactMetadata, output: Path) -> None:
    """Compile `program` into one self-contained shared library `output` (.so), weights inside."""
    example = program.example_inputs[0]
    with tempfile.TemporaryDirectory(prefix="torchat-aoti-") as scratch:
        options = {**_inductor_configs(metadata), "aot_inductor.output_path": str(Path(scratch) / "model.so"),
                   "aot_inductor.package_constants_in_so": True}
        with torch.no_grad():
            built = torch._inductor.aot_compile(program.module(), example, options=options)
        shutil.copyfile(built, output)
    payload = metadata.to_json().encode()
    with open(output, "ab") as f:
        f.write(payload + struct.pack("<Q8s", len(payload), DSO_TRAILER_MAGIC))
