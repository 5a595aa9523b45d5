"""ExecuTorch: an exported forward lowered to XNNPACK, with torchat's metadata as constant methods.

XNNPACK runs fp32 and the dynamic-activation linear schemes (8da4w, 8da8w) plus int8/int4 embeddings; weight-only
linear quant lowers *silently wrong* there (the weight scales are dropped), which `torchat.quant.backend_support`
refuses before anything is lowered. The embedding quant needs `do_quant_fusion_and_const_prop` to become
`quantized_decomposed::embedding_byte/4bit`, run by executorch's quantized kernels.
"""

from pathlib import Path

import torch
from torch.export import ExportedProgram

from torchat.exported import PTE_METADATA_METHOD, ArtifactMetadata


def constant_methods(metadata: ArtifactMetadata) -> dict:
    """The methods a C++ runner calls for the metadata: ExecuTorch-llama's names plus the whole JSON."""
    methods = {PTE_METADATA_METHOD: metadata.to_json(), "get_max_seq_len": metadata.max_seq_len,
               "get_vocab_size": metadata.vocab_size, "get_max_batch_size": 1, "use_kv_cache": True,
               "enable_dynamic_shape": True}
    if metadata.bos_id is not None:
        methods["get_bos_id"] = metadata.bos_id
    if metadata.eos_id is not None:
        methods["get_eos_id"] = metadata.eos_id
    return methods


def lower_et(program: ExportedProgram, metadata: ArtifactMetadata, output: Path) -> None:
    """Lower `program` to an XNNPACK-delegated ExecuTorch program `output` (.pte)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    with torch.no_grad():
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=constant_methods(metadata))
        executorch_program = edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True,
                                                                        do_quant_fusion_and_const_prop=True))
    Path(output).write_bytes(executorch_program.buffer)
