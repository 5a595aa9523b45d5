"""The build graph as data: models, quant presets, backends and the target matrix read from targets/*.toml.

A target is `MODEL-QUANT[-DTYPE]-BACKEND`, parsed from the right against closed vocabularies; its canonical name
leaves the dtype out when it is the backend's default. Each step of a target is a `Node`: what the step is asked
to do (its resolved spec), the upstream nodes it reads, the CLI verb and arguments that do it, and the source
files and distributions whose versions enter its key. Nothing here runs anything; the store realizes nodes.

Standard library only (plus the torch-free torchat.configs and torchat.cli tables): `doit list` loads this.
"""

import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from torchat.cli import VERBS
from torchat.configs import KNOWN_CONFIGS
from torchat.errors import TorchatError, unknown_key_error

UNPINNED = "unpinned"
REPO_ROOT = Path(__file__).resolve().parent.parent


class Backend(StrEnum):
    EAGER = "eager"  # the persisted quantized checkpoint, run by the Python generator
    AOTI = "aoti"    # an AOT Inductor package (.pt2)
    ET = "et"        # an ExecuTorch program (.pte)


class Dtype(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Format(StrEnum):
    GGUF = "gguf"
    LLAMA2C = "llama2c"
    META = "meta"
    HF = "hf"
    TORCHAT = "torchat"


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
    """How a step runs: its CLI verb, who provides that verb, and what enters its key besides the inputs."""

    verb: str
    provider: str                # named in the error while the verb does not exist yet
    code: tuple[str, ...]        # repo-relative files/directories run by the step, besides the verb's module
    toolchain: tuple[str, ...]   # distributions whose versions enter the key


# What each step runs besides its verb's module, as packages and files; tests/test_layering.py checks that these
# cover every torchat module the verb imports (at any depth), so the lists cannot drift from the code.
_LOAD = ("torchat/model.py", "torchat/configs.py", "torchat/checkpoint", "torchat/loader.py", "torchat/tokenizers",
         "torchat/exported.py", "torchat/kernels", "torchat/generate.py")
_RUN = (*_LOAD, "torchat/quant")
STEPS: dict[Step, StepInfo] = {
    # a pinned sha256 fully determines a download's output: no toolchain; its code (the verb) only decides how
    Step.DOWNLOAD: StepInfo("download", "the build-graph issue (torchat/manage.py)", ("torchat/sources.py",), ()),
    Step.CONVERT: StepInfo("convert", "the checkpoint-conversion work (torchat/convert.py)", _LOAD,
                           ("torch", "safetensors", "gguf", "numpy", "sentencepiece", "tiktoken", "tokenizers")),
    Step.QUANTIZE: StepInfo("quantize", "the quantization issue", (*_LOAD, "torchat/quant", "torchat/assets.py"),
                            ("torch", "torchao", "safetensors")),
    Step.BUILD: StepInfo("export", "the lowering issue (AOTI / ExecuTorch export)",
                         (*_RUN, "torchat/lowering", "torchat/convert.py"), ("torch", "torchao")),
    Step.TOKENIZER: StepInfo("tokenizer-bin", "the C++ runner issue (tokenizer.bin)",
                             ("torchat/tokenizers", "torchat/templates.py"),
                             ("sentencepiece", "tiktoken", "tokenizers")),
    Step.RUNNER: StepInfo("runner", "the C++ runner issue", (), ("torch", "executorch", "cmake")),
    Step.EVAL: StepInfo("eval", "the evaluation issue", (*_RUN, "torchat/evaluation"),
                        ("torch", "torchao", "executorch", "lm-eval", "datasets")),
    Step.BENCH: StepInfo("bench", "the benchmark issue (torchat/bench_cli.py)",
                         (*_RUN, "torchat/bench.py", "torchat/peers.py", "torchat/assets.py", "torchat/sources.py",
                          "torchat/threads.py"),
                         ("torch", "torchao", "executorch")),
}


@dataclass(frozen=True)
class BackendInfo:
    """What lowering to a backend produces. `output` None: the quantized checkpoint itself is the artifact."""

    output: str | None
    export_flag: str | None
    runner_code: tuple[str, ...]  # the C++ runner's sources (the runner step's code)
    toolchain: tuple[str, ...]


BACKENDS: dict[Backend, BackendInfo] = {
    Backend.EAGER: BackendInfo(None, None, (), ()),
    Backend.AOTI: BackendInfo("model.pt2", "--output-aoti-package-path", ("runner", "runner-aoti"), ()),
    Backend.ET: BackendInfo("model.pte", "--output-pte-path", ("runner", "runner-et", "torchat/kernels/et_sdpa.cpp"),
                            ("executorch",)),
}
RUNNER_BACKENDS = [b for b, info in BACKENDS.items() if info.output]
PER_MODEL_STEPS = (Step.DOWNLOAD, Step.CONVERT, Step.TOKENIZER)


@dataclass(frozen=True)
class FileSpec:
    """One file of a model: a source string (see torchat.sources) and its pinned sha256 (None: unpinned)."""

    source: str
    sha256: str | None
    archive_sha256: str | None = None
    targets_dir: str = ""  # what a relative `path:` source is relative to

    @property
    def name(self) -> str:
        kind, _, rest = self.source.partition(":")
        rest = rest.partition("#")[2] if kind.startswith("pypi") else rest.partition("@")[0]
        return Path(rest).name

    @property
    def fetchable_source(self) -> str:
        """The source with a relative `path:` made absolute against the targets directory."""
        kind, _, rest = self.source.partition(":")
        if kind == "path" and not Path(rest).expanduser().is_absolute():
            return f"path:{Path(self.targets_dir) / rest}"
        return self.source

    def as_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256 or UNPINNED, "archive_sha256": self.archive_sha256}


@dataclass(frozen=True)
class ModelSpec:
    key: str
    config: str                   # a KNOWN_CONFIGS name (--params-table)
    format: Format
    files: tuple[FileSpec, ...]   # the checkpoint (several files for sharded hub checkpoints)
    tokenizer: FileSpec | None    # None: the tokenizer is inside the checkpoint (GGUF)
    gated: bool = False
    description: str = ""

    @property
    def all_files(self) -> tuple[FileSpec, ...]:
        return self.files + ((self.tokenizer,) if self.tokenizer else ())

    @property
    def pinned(self) -> bool:
        return all(f.sha256 for f in self.all_files)


@dataclass(frozen=True)
class QuantPreset:
    key: str
    quant_json: str  # the quant JSON (torchat/quant/spec.py), in its file's order: schemes apply in order
    description: str = ""
    max_degradation_pct: float | None = None  # word perplexity over the fp32 eager baseline's; None: not gated

    @property
    def options(self) -> dict:
        return json.loads(self.quant_json)


@dataclass(frozen=True)
class TargetSpec:
    model: ModelSpec
    quant: QuantPreset
    dtype: Dtype
    backend: Backend
    name: str  # canonical: the dtype is left out when it is the backend's default

    @property
    def long_name(self) -> str:
        return f"{self.model.key}-{self.quant.key}-{self.dtype}-{self.backend}"

    @property
    def quantized_name(self) -> str:
        return f"{self.model.key}-{self.quant.key}-{self.dtype}"


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


@functools.cache
def native_toolchain() -> dict[str, str]:
    """The C++ compiler's and cmake's versions and the Python environment whose torch/executorch libraries a runner
    links (its RUNPATH points there), which enter the runner step's key (a few ms: runner nodes only)."""
    found = {"python_prefix": sys.prefix}
    for name, argv in (("cxx", [os.environ.get("CXX", "c++"), "--version"]), ("cmake", ["cmake", "--version"])):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            found[name] = result.stdout.splitlines()[0].strip() if result.stdout else "absent"
        except OSError:
            found[name] = "absent"
    return found


def targets_dir() -> Path:
    """$TORCHAT_TARGETS_DIR, else the checkout's targets/."""
    return Path(os.environ.get("TORCHAT_TARGETS_DIR") or REPO_ROOT / "targets").expanduser().resolve()


def verb_code_path(verb: str) -> str | None:
    """The repo-relative file (or package directory) of a verb's module; None if the verb is not registered."""
    module = VERBS.get(verb)
    if module is None:
        return None
    base = module.replace(".", "/")
    return base if (REPO_ROOT / base).is_dir() else base + ".py"


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise TorchatError(f"{path}: missing; the targets directory needs models.toml, quant.toml and "
                           "matrix.toml (set TORCHAT_TARGETS_DIR to use another one)") from None
    except tomllib.TOMLDecodeError as error:
        raise TorchatError(f"{path}: invalid TOML ({error}); fix the file") from None


def _sha(value, where: str) -> str | None:
    if value == UNPINNED:
        return None
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise TorchatError(f"{where}: sha256 must be 64 lowercase hex digits or {UNPINNED!r}, got {value!r}")
    return value


MODEL_FIELDS = {"description", "config", "format", "source", "sha256", "archive_sha256", "tokenizer", "gated"}


def _model_spec(key: str, entry: dict, where: str, base: str) -> ModelSpec:
    if not isinstance(entry, dict) or set(entry) - MODEL_FIELDS:
        unknown = sorted(set(entry) - MODEL_FIELDS) if isinstance(entry, dict) else [key]
        raise TorchatError(f"{where}: [{key}] has unknown field {unknown[0]!r}; the fields are: "
                           f"{', '.join(sorted(MODEL_FIELDS))}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
        raise TorchatError(f"{where}: model key {key!r} may hold only letters, digits, '.', '_' and '-'")
    def need(field):
        if field not in entry:
            raise TorchatError(f"{where}: [{key}] has no {field!r}; add it")
        return entry[field]

    config = need("config")
    if config not in KNOWN_CONFIGS:
        raise TorchatError(f"{where}: [{key}] " + str(unknown_key_error("config", config, KNOWN_CONFIGS)))
    fmt = need("format")
    if fmt not in Format.__members__.values():
        raise TorchatError(f"{where}: [{key}] " + str(unknown_key_error("format", fmt, list(Format))))
    sources, digests = need("source"), need("sha256")
    sources = [sources] if isinstance(sources, str) else sources
    digests = [digests] if isinstance(digests, str) else digests
    if len(sources) != len(digests) or not sources:
        raise TorchatError(f"{where}: [{key}] needs one sha256 per source ({len(sources)} sources, "
                           f"{len(digests)} digests)")
    files = tuple(FileSpec(s, _sha(d, f"{where}: [{key}]"), entry.get("archive_sha256"), base)
                  for s, d in zip(sources, digests))
    tok = entry.get("tokenizer", "embedded")
    if tok != "embedded" and not (isinstance(tok, dict) and "source" in tok and "sha256" in tok):
        raise TorchatError(f"{where}: [{key}] tokenizer must be \"embedded\" or {{source = ..., sha256 = ...}}")
    tokenizer = None if tok == "embedded" else FileSpec(tok["source"], _sha(tok["sha256"], f"{where}: [{key}]"),
                                                         tok.get("archive_sha256"), base)
    model = ModelSpec(key, config, Format(fmt), files, tokenizer, bool(entry.get("gated", False)),
                      entry.get("description", ""))
    names = [f.name for f in model.all_files]
    if len(set(names)) != len(names):
        raise TorchatError(f"{where}: [{key}] has two files named alike ({names}); they share a directory")
    return model


PRESET_FIELDS = {"quant", "description", "max_degradation_pct"}
# An fp32 target without quantization must evaluate as its eager baseline does, whatever backend runs it: its
# gate is this tight, whatever its preset allows for other dtypes
FP32_PARITY_PCT = 0.1


def _quant_preset(key: str, entry: dict, where: str) -> QuantPreset:
    if not isinstance(entry, dict) or not isinstance(entry.get("quant"), dict) or set(entry) - PRESET_FIELDS:
        raise TorchatError(f"{where}: [{key}] must hold `quant = {{...}}` (the quant JSON; {{}} for none) and "
                           "optionally `description` and `max_degradation_pct`, nothing else")
    bound = entry.get("max_degradation_pct")
    if bound is not None and not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound >= 0):
        raise TorchatError(f"{where}: [{key}] max_degradation_pct must be a number >= 0 (percent of word "
                           f"perplexity over the fp32 baseline), got {bound!r}")
    return QuantPreset(key, json.dumps(entry["quant"]), entry.get("description", ""),
                       None if bound is None else float(bound))


def _expand(value, universe: dict, kind: str, where: str) -> list[str]:
    if value == "*":
        return list(universe)
    for item in value:
        if item not in universe:
            raise TorchatError(f"{where}: " + str(unknown_key_error(kind, item, universe)))
    return list(value)


class Catalog:
    """The loaded targets: registries keyed by their tokens, the matrix, and the nodes of the graph."""

    def __init__(self, root: Path):
        self.root = root
        models = _read_toml(root / "models.toml")
        quants = _read_toml(root / "quant.toml")
        matrix = _read_toml(root / "matrix.toml")
        self.models = {k: _model_spec(k, v, str(root / "models.toml"), str(root)) for k, v in models.items()}
        self.quants = {k: _quant_preset(k, v, str(root / "quant.toml")) for k, v in quants.items()}
        where = str(root / "matrix.toml")
        self.default_dtype: dict[Backend, Dtype] = {}
        self.refusals: dict[Backend, tuple[set[str], str]] = {}
        for backend in Backend:
            entry = matrix.get("backends", {}).get(backend)
            if entry is None:
                raise TorchatError(f"{where}: no [backends.{backend}]; give it a default_dtype")
            dtype = entry.get("default_dtype")
            if dtype not in list(Dtype):
                raise TorchatError(f"{where}: [backends.{backend}] " + str(unknown_key_error("dtype", dtype, Dtype)))
            self.default_dtype[backend] = Dtype(dtype)
            refused = set(_expand(entry.get("refuse_quants", []), self.quants, "quant preset", where))
            self.refusals[backend] = (refused, entry.get("refuse_reason", ""))
        self.device = matrix.get("defaults", {}).get("device", "cpu")
        self.max_seq_len = int(matrix.get("defaults", {}).get("max_seq_len", 2048))  # the KV cache of exports
        self.eval_args = _eval_args(matrix.get("eval", {}), where)
        self.default_model = matrix.get("defaults", {}).get("model", next(iter(self.models), ""))
        if self.default_model not in self.models:
            raise TorchatError(f"{where}: [defaults] " + str(unknown_key_error("model", self.default_model,
                                                                               self.models)))
        self.targets: dict[str, TargetSpec] = {}
        for entry in matrix.get("matrix", []):
            for m in _expand(entry.get("models", "*"), self.models, "model", where):
                for q in _expand(entry.get("quants", "*"), self.quants, "quant preset", where):
                    for b in _expand(entry.get("backends", "*"), self.default_dtype, "backend", where):
                        backend = Backend(b)
                        if q in self.refusals[backend][0]:
                            continue
                        for d in entry.get("dtypes", [self.default_dtype[backend]]):
                            if d not in list(Dtype):
                                raise TorchatError(f"{where}: [[matrix]] " + str(unknown_key_error("dtype", d, Dtype)))
                            target = self.target(m, q, d, backend)
                            self.targets.setdefault(target.name, target)
        self._nodes: dict[tuple, Node] = {}

    def target(self, model: str, quant: str, dtype: str | None, backend: str) -> TargetSpec:
        """The target of these keys; an unknown key lists the valid ones, a refused combination says why."""
        if backend not in list(Backend):
            raise unknown_key_error("backend", backend, Backend)
        backend = Backend(backend)
        if dtype is not None and dtype not in list(Dtype):
            raise unknown_key_error("dtype", dtype, Dtype)
        if quant not in self.quants:
            raise unknown_key_error("quant preset", quant, self.quants)
        if model not in self.models:
            raise unknown_key_error("model", model, self.models)
        refused, reason = self.refusals[backend]
        if quant in refused:
            raise TorchatError(f"quant preset {quant!r} is refused for backend {backend}: {reason}; choose one of: "
                               f"{', '.join(sorted(set(self.quants) - refused))}")
        dtype = Dtype(dtype or self.default_dtype[backend])
        short = dtype == self.default_dtype[backend]
        name = f"{model}-{quant}-{backend}" if short else f"{model}-{quant}-{dtype}-{backend}"
        return TargetSpec(self.models[model], self.quants[quant], dtype, backend, name)

    def parse_target(self, name: str) -> TargetSpec:
        """`MODEL-QUANT[-DTYPE]-BACKEND`, parsed from the right; no fuzzy matching."""
        try:
            rest, _, backend = name.rpartition("-")
            if backend not in list(Backend):
                raise unknown_key_error("backend", backend, Backend)
            head, _, maybe_dtype = rest.rpartition("-")
            dtype = maybe_dtype if maybe_dtype in list(Dtype) else None
            rest = head if dtype else rest
            tokens = rest.split("-")
            if len(tokens) < 2:
                raise TorchatError(f"expected a model and a quant preset before the backend; models: "
                                   f"{', '.join(sorted(self.models))}; quant presets: {', '.join(sorted(self.quants))}")
            for n in range(len(tokens) - 1, 0, -1):  # the longest quant key whose remainder is a model
                quant, model = "-".join(tokens[-n:]), "-".join(tokens[:-n])
                if quant in self.quants and model in self.models:
                    return self.target(model, quant, dtype, backend)
            quants = [q for n in range(1, len(tokens)) if (q := "-".join(tokens[-n:])) in self.quants]
            if not quants:
                raise unknown_key_error("quant preset", tokens[-1], self.quants)
            raise unknown_key_error("model", rest[:-len(quants[-1]) - 1], self.models)
        except TorchatError as error:
            raise TorchatError(f"target {name!r} (MODEL-QUANT[-DTYPE]-BACKEND): {error}") from None

    def model(self, key: str) -> ModelSpec:
        if key not in self.models:
            raise unknown_key_error("model", key, self.models)
        return self.models[key]

    # --- nodes -------------------------------------------------------------------------------------------

    def _node(self, step: Step, name: str, spec: dict, deps, args, model: str, doc: str,
              code: tuple[str, ...] = (), toolchain: tuple[str, ...] = (), alias: bool = False) -> Node:
        key = (step, name)
        if key not in self._nodes:
            info = STEPS[step]
            verb = None if alias else info.verb
            verb_path = verb_code_path(verb) if verb else None
            self._nodes[key] = Node(step, name, json.dumps(spec, sort_keys=True), tuple(deps), tuple(args), verb,
                                    tuple(sorted({*info.code, *code, *([verb_path] if verb_path else [])})),
                                    tuple(sorted({*info.toolchain, *toolchain})), model, doc)
        return self._nodes[key]

    def download_node(self, model: ModelSpec) -> Node:
        spec = {"files": [f.as_dict() for f in model.files],
                "tokenizer": model.tokenizer.as_dict() if model.tokenizer else "embedded"}
        return self._node(Step.DOWNLOAD, model.key, spec, (), (model.key, "--output-dir", Ref("out")), model.key,
                          f"fetch {model.key}'s files ({'pinned' if model.pinned else 'UNPINNED'})")

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
        if info.output is None:
            return self._node(Step.BUILD, target.name, spec, [("checkpoint", quantized)], (), target.model.key,
                              f"{target.name}: the quantized checkpoint, run eagerly", alias=True)
        args = ["--checkpoint-dir", Ref("checkpoint"), "--dtype", target.dtype, "--device", self.device,
                "--max-seq-length", str(max_seq_len), info.export_flag, Ref("out", info.output)]
        return self._node(Step.BUILD, target.name, spec, [("checkpoint", quantized)], args, target.model.key,
                          f"lower {target.quantized_name} to {target.backend} ({info.output})",
                          toolchain=info.toolchain)

    def tokenizer_node(self, model: ModelSpec) -> Node:
        args = ["--checkpoint-dir", Ref("checkpoint"), "--output-path", Ref("out", "tokenizer.bin")]
        return self._node(Step.TOKENIZER, model.key, {"output": "tokenizer.bin"},
                          [("checkpoint", self.convert_node(model))], args, model.key,
                          f"{model.key}'s tokenizer.bin for the C++ runners")

    def runner_node(self, backend: Backend) -> Node:
        info = BACKENDS[backend]
        return self._node(Step.RUNNER, str(backend), {"backend": backend, "native": native_toolchain()}, (),
                          ["--backend", backend, "--output-dir", Ref("out")], "",
                          f"the C++ runner for {backend}", code=info.runner_code, toolchain=info.toolchain)

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
        return self._node(step, target.name, spec, deps, args,
                          target.model.key, f"{step} {target.name}", toolchain=BACKENDS[target.backend].toolchain)

    def baseline_target(self, model: ModelSpec) -> TargetSpec:
        """The model unquantized, in fp32, run eagerly: what every eval of the model is compared with."""
        plain = [key for key, preset in self.quants.items() if not preset.options]
        if not plain:
            raise TorchatError(f"{self.root / 'quant.toml'}: no preset with `quant = {{}}`, which the eval gate "
                               "needs for the fp32 baseline; add `[none]` with `quant = {}`")
        return self.target(model.key, plain[0], Dtype.FP32, Backend.EAGER)

    def export_max_seq_len(self, model: ModelSpec) -> int:
        """The KV cache length of the model's exports (and of its evals, so that every backend sees the same
        windows)."""
        return min(KNOWN_CONFIGS[model.config].get("max_seq_len", self.max_seq_len), self.max_seq_len)

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


EVAL_FIELDS = {"tasks", "limit"}


def _eval_args(entry: dict, where: str) -> list[str]:
    """matrix.toml's optional [eval] table (tasks = [...], limit = N) as `torchat eval` arguments."""
    if not isinstance(entry, dict) or set(entry) - EVAL_FIELDS:
        raise TorchatError(f"{where}: [eval] may hold only {', '.join(sorted(EVAL_FIELDS))}")
    args = []
    tasks = entry.get("tasks")
    if tasks is not None:
        if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t and "," not in t for t in tasks)):
            raise TorchatError(f"{where}: [eval] tasks must be a list of lm-eval task names, got {tasks!r}")
        args += ["--tasks", ",".join(tasks)]
    limit = entry.get("limit")
    if limit is not None:
        if not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0):
            raise TorchatError(f"{where}: [eval] limit must be a number of documents (0: all), got {limit!r}")
        args += ["--limit", str(limit) if limit else "all"]
    return args


def load_catalog(root: Path | None = None) -> Catalog:
    return Catalog(root or targets_dir())
