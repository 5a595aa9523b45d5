"""AOT Inductor: an exported forward compiled to a .pt2 package or a bare .so, with torchat's metadata inside.

The .pt2 carries the metadata twice: as `<archive root>/extra/torchat.json` (read without loading the model) and as
the model's AOTI metadata key "torchat" (what a C++ runner gets from `AOTIModelPackageLoader::get_metadata()`).
The .so carries it as a trailer after the ELF image (see torchat.exported).

Both are reproducible: the same program gives the same bytes whatever the store, the temp directory, the inductor
cache (cold or warm) or where Python and torch are installed, so that a remote cache can serve them
(docs/remote-cache.md). Inductor compiles into a private scratch directory, under fixed file names, without line
tables and through a compiler wrapper that maps the scratch, torch and Python include directories to fixed names
(`__FILE__` in torch's AOTI runtime headers and the generated sources puts their paths into the .so); the
compile-command comments it appends to the generated sources are dropped. The archive's entry times are fixed by
torch, and its serialization_id derives from its contents.
"""

import shlex
import shutil
import struct
import sysconfig
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.export import ExportedProgram

from torchat.exported import DSO_TRAILER_MAGIC, PT2_METADATA_FILE, ArtifactMetadata

# the generated files' stem (model.wrapper.cpp, model.kernel.cpp, ...): else a hash of sources that hold paths
GENERATED_FILES_NAME = "model"
# inductor appends "\n// Compile cmd\n// g++ ...\n// Link cmd\n// g++ ...\n" to each generated source: the command
# lines name the scratch directory, the compiler wrapper in it and the Python environment
_COMMAND_COMMENTS = "\n// Compile cmd\n"


def _c_shims() -> dict:
    """torchat's linear ops (on CPU) as direct calls of the C functions torchat/kernels/torch_linear.cpp defines,
    rather than through the proxy executor (a lookup in torch's dispatcher per call, and a file beside the model)."""
    import torchat.quant.asym4  # noqa: F401  (the ops' definitions)
    import torchat.quant.intx  # noqa: F401
    from torchat.kernels import TORCH_C_SHIMS

    return {getattr(torch.ops.torchat, name).default: [declaration] for name, declaration in TORCH_C_SHIMS.items()}


def _inductor_configs(metadata: ArtifactMetadata, scratch: Path) -> dict:
    return {"aot_inductor.custom_ops_to_c_shims": _c_shims(),
            "aot_inductor.metadata": {"torchat": metadata.to_json(), "max_seq_len": str(metadata.max_seq_len),
                                      "vocab_size": str(metadata.vocab_size)},
            "aot_inductor.model_name_for_generated_files": GENERATED_FILES_NAME,
            "aot_inductor.enable_line_tables": False,
            # a precompiled header is cached under the compiler's path, which is the scratch directory's wrapper
            "aot_inductor.precompile_headers": False,
            "cpp.cxx": (str(_write_compiler_wrapper(scratch)),)}


def _write_compiler_wrapper(scratch: Path) -> Path:
    """A script under `scratch` that runs inductor's C++ compiler with prefix maps for the directories whose paths
    would enter the .so; named as the compiler is, since inductor tells gcc from clang by the name."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = shutil.which(get_cpp_compiler())
    assert compiler, get_cpp_compiler()
    prefixes = {scratch: ".", Path(torch.__file__).parent.parent: "site-packages",
                Path(sysconfig.get_path("include")): "python-include"}
    maps = " ".join(shlex.quote(f"-ffile-prefix-map={path}={name}") for path, name in prefixes.items())
    wrapper = scratch / "compiler" / Path(compiler).name
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(compiler)} {maps} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@contextmanager
def _compiling():
    """Inductor's compile, its randomness fixed (a model whose weights pass 2 GB gets a torch.randint magic number
    in its .so), the caller's random state left alone."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _strip_build_paths(source: Path, scratch: Path) -> None:
    """Drop the compile-command comments inductor appended to `source` and name its sibling files relatively."""
    text = source.read_text()
    code, marker, commands = text.partition(_COMMAND_COMMENTS)
    assert all(line.startswith("// ") for line in commands.splitlines()), f"{source.name}: {commands[:200]!r}"
    code = code.replace(f"{scratch}/", "")  # the kernel source's "embedded as comments in <wrapper path>"
    assert str(scratch) not in code, f"{source.name} names the scratch directory {scratch}"
    source.write_text(code + "\n" if marker else code)


def lower_aoti_package(programs: dict[str, ExportedProgram], metadata: ArtifactMetadata, output: Path) -> None:
    """Compile the forward program into the AOTI package `output` (.pt2), the metadata as its extra file
    torchat.json."""
    from torch.export.pt2_archive._package import package_pt2

    program = programs["forward"]
    example = program.example_inputs[0]
    with tempfile.TemporaryDirectory(prefix="torchat-aoti-") as scratch:
        scratch = Path(scratch).resolve()
        options = {**_inductor_configs(metadata, scratch), "aot_inductor.output_path": str(scratch),
                   "aot_inductor.package": True}
        with _compiling():
            files = torch._inductor.aot_compile(program.module(), example, options=options)
        for file in files:
            assert isinstance(file, str) and Path(file).is_relative_to(scratch), file
            if file.endswith((".cpp", ".h")):
                _strip_build_paths(Path(file), scratch)
        package_pt2(str(output), aoti_files={"model": sorted(files)},
                    extra_files={PT2_METADATA_FILE: metadata.to_json()})


def lower_aoti_dso(programs: dict[str, ExportedProgram], metadata: ArtifactMetadata, output: Path) -> None:
    """Compile the forward program into one self-contained shared library `output` (.so), weights inside."""
    program = programs["forward"]
    example = program.example_inputs[0]
    with tempfile.TemporaryDirectory(prefix="torchat-aoti-") as scratch:
        scratch = Path(scratch).resolve()
        options = {**_inductor_configs(metadata, scratch), "aot_inductor.output_path": str(scratch / "model.so"),
                   "aot_inductor.package_constants_in_so": True}
        with _compiling():
            built = torch._inductor.aot_compile(program.module(), example, options=options)
        shutil.copyfile(built, output)
    payload = metadata.to_json().encode()
    with open(output, "ab") as f:
        f.write(payload + struct.pack("<Q8s", len(payload), DSO_TRAILER_MAGIC))
