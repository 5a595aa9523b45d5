"""The build graph as data: models, quant presets and the target matrix read from targets/*.toml, and the nodes
of the graph they declare.

    names.py      the target-name grammar MODEL-QUANT[-DTYPE]-BACKEND, parsed from the right
    catalog.py    targets/*.toml read and checked: models (with pins.lock), presets (normalised), the matrix
    graph.py      the steps, their verbs and code, and the nodes: Step, STEPS, Node, Ref, Catalog, load_catalog
    toolchain.py  the C++ compiler and cmake a runner is built with

Standard library only (plus the torch-free torchat.configs, torchat.vocabulary, torchat.pins and
torchat.quant.spec): `doit list` loads this. It never imports the CLI: a step names its verb's module by path.
"""

from torchat.errors import TorchatError
from torchat.spec.catalog import (FP32_PARITY_PCT, REPO_ROOT, UNPINNED, FileSpec, Format, ModelSpec, QuantPreset,
                                  Targets, TargetSpec, targets_dir)
from torchat.spec.graph import (BACKEND_BUILDS, PER_MODEL_STEPS, RUNNER_BACKENDS, STEPS, BackendBuild, Catalog, Node,
                                Ref, Step, StepInfo, load_catalog, verb_code_path)
from torchat.spec.names import GRAMMAR, TargetName, canonical_name, split_target_name
from torchat.spec.toolchain import native_toolchain
from torchat.vocabulary import BACKENDS, BackendInfo, Backend, Device, Dtype

__all__ = ["BACKENDS", "BACKEND_BUILDS", "Backend", "BackendBuild", "BackendInfo", "Catalog", "Device", "Dtype",
           "FP32_PARITY_PCT", "FileSpec", "Format", "GRAMMAR", "ModelSpec", "Node", "PER_MODEL_STEPS", "QuantPreset",
           "REPO_ROOT", "RUNNER_BACKENDS", "Ref", "STEPS", "Step", "StepInfo", "TargetName", "TargetSpec", "Targets",
           "TorchatError", "UNPINNED", "canonical_name", "load_catalog", "native_toolchain", "split_target_name",
           "targets_dir", "verb_code_path"]
