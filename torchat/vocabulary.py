"""torchat's closed vocabularies, each declared once: backends (what they write, which dtypes and devices they
take), dtypes, devices and the default KV cache length.

Standard library only: the build graph (`doit list`) reads these without torch. The torch dtypes of these names
live in torchat.dtypes, the one module that maps names to torch objects.
"""

from dataclasses import dataclass
from enum import StrEnum


class Backend(StrEnum):
    EAGER = "eager"  # the persisted (quantized) checkpoint, run by the Python generator
    AOTI = "aoti"    # an AOT Inductor package (.pt2) or shared library (.so)
    ET = "et"        # an ExecuTorch program (.pte)


class Dtype(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


# The KV cache length an exported artifact holds, and the eager cache of chat and eval, unless --max-seq-length
# says otherwise (or the model's context is shorter).
DEFAULT_MAX_SEQ_LEN = 2048

# other spellings users write for a dtype (the seed's JSON and torch's names)
DTYPE_ALIASES = {"float32": Dtype.FP32, "float": Dtype.FP32, "bfloat16": Dtype.BF16, "float16": Dtype.FP16,
                 "half": Dtype.FP16}


@dataclass(frozen=True)
class BackendInfo:
    """What a backend writes and runs on. `output` None: the (quantized) checkpoint itself is the artifact."""

    output: str | None            # the file a build target publishes (the store's fixed name)
    suffixes: tuple[str, ...]     # the artifact files it reads and writes, the first being `output`'s
    dtypes: tuple[Dtype, ...]
    devices: tuple[Device, ...]
    default_dtype: Dtype          # what a target name that leaves out its dtype gets
    export_flag: str | None       # `torchat export`'s flag that writes `output`


BACKENDS: dict[Backend, BackendInfo] = {
    Backend.EAGER: BackendInfo(None, (), tuple(Dtype), tuple(Device), Dtype.BF16, None),
    Backend.AOTI: BackendInfo("model.pt2", (".pt2", ".so"), tuple(Dtype), (Device.CPU, Device.CUDA), Dtype.BF16,
                              "--output-aoti-package-path"),
    # XNNPACK's fp32 path; its fp16/bf16 support is partial and not checked, so those are refused
    Backend.ET: BackendInfo("model.pte", (".pte",), (Dtype.FP32,), (Device.CPU,), Dtype.FP32, "--output-pte-path"),
}

# artifact file suffix -> the backend that reads it
ARTIFACT_SUFFIXES: dict[str, Backend] = {suffix: backend for backend, info in BACKENDS.items()
                                         for suffix in info.suffixes}


def dtype_name(value: str) -> Dtype | None:
    """The Dtype a user's spelling names (fp32, float32, bfloat16, ...), or None."""
    if value in Dtype._value2member_map_:
        return Dtype(value)
    return DTYPE_ALIASES.get(value)
