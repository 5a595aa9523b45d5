"""The build graph's nodes: one per step of a model or a target.

A `Node` says what its step is asked to do (the resolved spec), the upstream nodes it reads, the CLI verb and
arguments that do it, and the source files and distributions whose versions enter its key. Nothing here runs
anything; the store realizes nodes. Standard library only.
"""

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from torchat.configs import KNOWN_CONFIGS
from torchat.errors import TorchatError, unknown_key_error
from torchat.spec.catalog import FP32_PARITY_PCT, ModelSpec, QuantPreset, Targets, TargetSpec, targets_dir
from torchat.spec.toolchain import compiled_code_target, native_toolchain
from torchat.vocabulary import BACKENDS, Backend, Dtype


class Step(StrEnum):
    DOWNLOAD = "download"
    CONVERT = "convert"
    QUANTIZE = "quantize"
    BUILD = "build"
    TOKENIZER = "tokenizer"
    RUNNER = "runner"
    EVAL = "eval"
    BENCH = "bench"


@dataclass(frozen=True)
class StepInfo:
    """How a step runs: its CLI verb and the module that implements it, who provides that verb, and what enters
    its key besides the inputs."""

    verb: str
    module: str                  # the repo-relative file of the verb's module (its digest enters the key)
    provider: str                # named in the error while the verb does not exist yet
    code: tuple[str, ...]        # repo-relative files/directories run by the step, besides the verb's module
    toolchain: tuple[str, ...]   # distributions whose versions enter the key


# What each step runs besides its verb's module, as packages and files; tests/test_layering.py checks that these
# cover every torchat module the verb imports (at any depth), so the lists cannot drift from the code.
# what opening any model runs (torchat.model_source, reached through the verbs' shared flags), quant included: a
# verb's code is all that its module can reach, and every model-opening verb can quantize
_LOAD = ("torchat/model.py", "torchat/configs.py", "torchat/checkpoint", "torchat/model_source.py",
         "torchat/tokenizers", "torchat/exported.py", "torchat/kernels", "torchat/generate.py", "torchat/vocabulary.py",
         "torchat/dtypes.py", "torchat/quant", "torchat/templates.py", "torchat/convert.py", "torchat/tokenizer_bin.py",
         "torchat/cli/flags.py")
_RUN = _LOAD
STEPS: dict[Step, StepInfo] = {
    # a pinned sha256 fully determines a download's output: no toolchain; its code (the verb) only decides how
    Step.DOWNLOAD: StepInfo("download", "torchat/cli/manage.py", "the build-graph issue", ("torchat/sources.py",),
                            ()),
    Step.CONVERT: StepInfo("convert", "torchat/cli/convert.py", "the checkpoint-conversion work",
                           _LOAD,
                           ("torch", "safetensors", "gguf", "numpy", "sentencepiece", "tiktoken", "tokenizers")),
    Step.QUANTIZE: StepInfo("quantize", "torchat/cli/quantize.py", "the quantization issue",
                            (*_LOAD, "torchat/assets.py"), ("torch", "torchao", "safetensors")),
    Step.BUILD: StepInfo("export", "torchat/cli/export.py", "the lowering issue (AOTI / ExecuTorch export)",
                         (*_RUN, "torchat/lowering"), ("torch", "torchao")),
    Step.TOKENIZER: StepInfo("tokenizer-bin", "torchat/cli/tokenizer_bin.py", "the C++ runner issue (tokenizer.bin)",
                             ("torchat/tokenizers", "torchat/templates.py", "torchat/tokenizer_bin.py"),
                             ("sentencepiece", "tiktoken", "tokenizers")),
    Step.RUNNER: StepInfo("runner", "torchat/cli/runner.py", "the C++ runner issue", ("torchat/runner_build.py",),
                          ("torch", "executorch", "cmake")),
    Step.EVAL: StepInfo("eval", "torchat/cli/eval.py", "the evaluation issue", (*_RUN, "torchat/evaluation"),
                        ("torch", "torchao", "executorch", "lm-eval", "datasets")),
    Step.BENCH: StepInfo("bench", "torchat/cli/bench.py", "the benchmark issue",
                         (*_RUN, "torchat/bench.py", "torchat/bench_jobs.py", "torchat/peers.py", "torchat/assets.py",
                          "torchat/sources.py", "torchat/threads.py"),
                         ("torch", "torchao", "executorch")),
}


@dataclass(frozen=True)
class BackendBuild:
    """What the graph adds to a backend's vocabulary entry: the code and distributions its builds depend on."""

    runner_code: tuple[str, ...]  # the C++ runner's sources (the runner step's code)
    toolchain: tuple[str, ...]    # enters the keys of the backend's builds, evals and benchmarks


BACKEND_BUILDS: dict[Backend, BackendBuild] = {
    Backend.EAGER: BackendBuild((), ()),
    Backend.AOTI: BackendBuild(("runner", "runner-aoti", "torchat/kernels"), ()),
    Backend.ET: BackendBuild(("runner", "runner-et", "torchat/kernels"), ("executorch",)),
}
RUNNER_BACKENDS = [b for b, info in BACKENDS.items() if info.output]
PER_MODEL_STEPS = (Step.DOWNLOAD, Step.CONVERT, Step.TOKENIZER)


def verb_code_path(verb: str) -> str | None:
    """The repo-relative file of the module of a step's verb; None if no step runs that verb."""
    return next((info.module for info in STEPS.values() if info.verb == verb), None)


@dataclass(frozen=True)
class Ref:
    """An argument naming an input's artifact directory (role) or the output directory ("out"), plus a path."""

    role: str
    path: str = ""


@dataclass(frozen=True)
class Node:
    """One step of the graph, realized by running `torchat VERB ARGS...` into a fresh output directory."""

    step: Step
    name: str                                 # the doit subtask name and the artifact's label
    spec: str                                 # canonical JSON of what the step is asked to do
    deps: tuple[tuple[str, "Node"], ...]      # (role, upstream node); refs in args name these roles
    args: tuple[str | Ref, ...]               # after the verb; empty with verb None
    verb: str | None                          # None: an alias whose artifact is its single input's
    code: tuple[str, ...]                     # repo-relative paths whose contents enter the key
    toolchain: tuple[str, ...]
    model: str                                # the model key (for `torchat list/remove`)
    doc: str = ""

    @property
    def task(self) -> str:
        return f"{self.step}:{self.name}"

    def __repr__(self) -> str:  # doit prints uptodate arguments; the task name says which node
        return f"Node({self.task})"


class Catalog(Targets):
    """The loaded targets and the nodes of their graph (each node made once, shared by its dependents)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._nodes: dict[tuple, Node] = {}

    def _node(self, step: Step, name: str, spec: dict, deps, args, model: str, doc: str,
              code: tuple[str, ...] = (), toolchain: tuple[str, ...] = (), alias: bool = False) -> Node:
        key = (step, name)
        if key not in self._nodes:
            info = STEPS[step]
            verb = None if alias else info.verb
            self._nodes[key] = Node(step, name, json.dumps(spec, sort_keys=True), tuple(deps), tuple(args), verb,
                                    tuple(sorted({*info.code, *code, *([info.module] if verb else [])})),
                                    tuple(sorted({*info.toolchain, *toolchain})), model, doc)
        return self._nodes[key]

    def download_node(self, model: ModelSpec) -> Node:
        spec = {"files": [f.as_dict() for f in model.files],
                "tokenizer": model.tokenizer.as_dict() if model.tokenizer else "embedded"}
        return self._node(Step.DOWNLOAD, model.key, spec, (), (model.key, "--output-dir", Ref("out")), model.key,
                          f"fetch {model.key}'s files ({'pinned' if model.pinned else 'pinned on first use'})")

    def convert_node(self, model: ModelSpec) -> Node:
        checkpoint = Ref("download", model.files[0].name) if len(model.files) == 1 else Ref("download")
        args = ["--checkpoint-path", checkpoint, "--format", model.format, "--params-table", model.config]
        if model.tokenizer:
            args += ["--tokenizer-path", Ref("download", model.tokenizer.name)]
        spec = {"format": model.format, "config": model.config, "model_args": KNOWN_CONFIGS[model.config]}
        return self._node(Step.CONVERT, model.key, spec, [("download", self.download_node(model))],
                          [*args, "--output-dir", Ref("out")], model.key,
                          f"convert {model.key} ({model.format}) to torchat's checkpoint")

    def quantize_node(self, model: ModelSpec, quant: QuantPreset, dtype: Dtype) -> Node:
        spec = {"quant": list(quant.options.items()), "dtype": dtype}  # pairs: the key keeps the order
        args = ["--checkpoint-dir", Ref("checkpoint"), "--quant", quant.quant_json, "--dtype", dtype,
                "--output-dir", Ref("out")]
        return self._node(Step.QUANTIZE, f"{model.key}-{quant.key}-{dtype}", spec,
                          [("checkpoint", self.convert_node(model))], args, model.key,
                          f"quantize {model.key} with {quant.key} ({quant.quant_json}) in {dtype}")

    def model_node(self, target: TargetSpec) -> Node:
        """The node whose artifact holds the target's runnable model (for eager: the quantized checkpoint)."""
        quantized = self.quantize_node(target.model, target.quant, target.dtype)
        return quantized if target.backend == Backend.EAGER else self.build_node(target)

    def build_node(self, target: TargetSpec) -> Node:
        info = BACKENDS[target.backend]
        quantized = self.quantize_node(target.model, target.quant, target.dtype)
        max_seq_len = self.export_max_seq_len(target.model)
        spec = {"backend": target.backend, "dtype": target.dtype, "device": self.device, "max_seq_len": max_seq_len}
        if target.backend == Backend.AOTI:
            spec["native"] = compiled_code_target()
        if info.output is None:
            return self._node(Step.BUILD, target.name, spec, [("checkpoint", quantized)], (), target.model.key,
                              f"{target.name}: the quantized checkpoint, run eagerly", alias=True)
        args = ["--checkpoint-dir", Ref("checkpoint"), "--dtype", target.dtype, "--device", self.device,
                "--max-seq-length", str(max_seq_len), info.export_flag, Ref("out", info.output)]
        return self._node(Step.BUILD, target.name, spec, [("checkpoint", quantized)], args, target.model.key,
                          f"lower {target.quantized_name} to {target.backend} ({info.output})",
                          toolchain=BACKEND_BUILDS[target.backend].toolchain)

    def tokenizer_node(self, model: ModelSpec) -> Node:
        args = ["--checkpoint-dir", Ref("checkpoint"), "--output-path", Ref("out", "tokenizer.bin")]
        return self._node(Step.TOKENIZER, model.key, {"output": "tokenizer.bin"},
                          [("checkpoint", self.convert_node(model))], args, model.key,
                          f"{model.key}'s tokenizer.bin for the C++ runners")

    def runner_node(self, backend: Backend) -> Node:
        build = BACKEND_BUILDS[backend]
        return self._node(Step.RUNNER, str(backend), {"backend": backend, "native": native_toolchain()}, (),
                          ["--backend", backend, "--output-dir", Ref("out")], "",
                          f"the C++ runner for {backend}", code=build.runner_code, toolchain=build.toolchain)

    def measure_node(self, step: Step, target: TargetSpec) -> Node:
        """An eval or bench node: it reads the target's model artifact and the converted checkpoint.

        An eval node also reads the eval of its model's fp32 eager baseline (unless it is that baseline) and
        fails when the target's perplexity exceeds the baseline's by more than its preset's bound."""
        args = ["--artifact-dir", Ref("model"), "--checkpoint-dir", Ref("checkpoint"), "--backend", target.backend,
                "--output-dir", Ref("out")]
        deps = [("model", self.model_node(target)), ("checkpoint", self.convert_node(target.model))]
        spec = {"backend": target.backend, "dtype": target.dtype}
        if step == Step.EVAL:
            baseline = self.baseline_target(target.model)
            args += ["--label", target.name, "--max-seq-length", str(self.export_max_seq_len(target.model)),
                     *self.eval_args]
            if target != baseline:
                bound = target.quant.max_degradation_pct
                if not target.quant.options and target.dtype == Dtype.FP32:
                    bound = FP32_PARITY_PCT if bound is None else min(bound, FP32_PARITY_PCT)
                deps.append(("baseline", self.measure_node(Step.EVAL, baseline)))
                args += ["--baseline-dir", Ref("baseline")]
                args += [] if bound is None else ["--max-degradation-pct", f"{bound:g}"]
                spec["max_degradation_pct"] = bound
        return self._node(step, target.name, spec, deps, args, target.model.key, f"{step} {target.name}",
                          toolchain=BACKEND_BUILDS[target.backend].toolchain)

    def nodes(self, step: Step, targets=None) -> list[Node]:
        """The nodes of one step family over `targets` (default: the matrix; every model for per-model steps)."""
        if step == Step.RUNNER:
            return [self.runner_node(b) for b in RUNNER_BACKENDS]
        if step in PER_MODEL_STEPS:
            models = self.models.values() if targets is None else [t.model for t in targets]
            return list({m.key: self._per_model(step)(m) for m in models}.values())
        make = {
            Step.QUANTIZE: lambda t: self.quantize_node(t.model, t.quant, t.dtype),
            Step.BUILD: self.build_node,
            Step.EVAL: lambda t: self.measure_node(Step.EVAL, t),
            Step.BENCH: lambda t: self.measure_node(Step.BENCH, t),
        }[step]
        targets = self.targets.values() if targets is None else targets
        return list({(n := make(t)).name: n for t in targets}.values())

    def _per_model(self, step: Step):
        return {Step.DOWNLOAD: self.download_node, Step.CONVERT: self.convert_node,
                Step.TOKENIZER: self.tokenizer_node}[step]

    def node_for(self, step: Step, name: str) -> Node:
        """The node of `step` named `name`: a model key (or a target) for per-model steps, else a target name."""
        if step == Step.RUNNER:
            if name not in RUNNER_BACKENDS:
                raise unknown_key_error("runner backend", name, RUNNER_BACKENDS)
            return self.runner_node(Backend(name))
        if step in PER_MODEL_STEPS:
            if name in self.models:
                return self._per_model(step)(self.models[name])
            try:
                return self._per_model(step)(self.parse_target(name).model)
            except TorchatError:
                raise unknown_key_error("model", name, self.models) from None
        if step == Step.QUANTIZE and name.rpartition("-")[2] in list(Dtype):
            target = self.parse_target(f"{name}-{Backend.EAGER}")  # MODEL-QUANT-DTYPE: eager's quantized model
            return self.quantize_node(target.model, target.quant, target.dtype)
        return self.nodes(step, [self.parse_target(name)])[0]


def load_catalog(root: Path | None = None) -> Catalog:
    return Catalog(root or targets_dir())
