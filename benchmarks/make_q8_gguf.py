"""Write a Q8_0 GGUF of a GGUF's own weights, for the llama.cpp peer at 8 bits.

The default model ships as Q4_1 only. Dequantizing its matrices and quantizing them again to Q8_0 (with gguf's
own quantizer) gives llama.cpp an 8-bit model of exactly the weights torchat's int8 starts from (torchat reads
the same GGUF, dequantized), so both sides compare on equal weights. Every metadata key, the tokenizer
included, is copied; 1-D tensors (norms) stay as they are; general.file_type says MOSTLY_Q8_0.

    python benchmarks/make_q8_gguf.py SOURCE.gguf OUTPUT.gguf
"""

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

SKIPPED_KEYS = ("GGUF.", "general.architecture")  # the writer writes these itself


def write_q8_0(source: Path, output: Path) -> None:
    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(output), arch)
    for name, field in reader.fields.items():
        if name.startswith(SKIPPED_KEYS):
            continue
        value = LlamaFileType.MOSTLY_Q8_0 if name == "general.file_type" else field.contents()
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type)
    for tensor in reader.tensors:
        # numpy shape: the reverse of GGUF's (rows last in GGUF order)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if len(shape) == 2 and tensor.tensor_type != GGMLQuantizationType.F32:
            weights = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
            packed = quantize(weights, GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(shape), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write_q8_0(Path(sys.argv[1]), Path(sys.argv[2]))
