"""The targets directory read and checked: models (models.toml, with the pins of pins.lock), quant presets
(quant.toml, normalised as `--quant` is) and the target matrix (matrix.toml).

Every mistake names the file, the key and the fix. What a backend writes, its dtypes and the default KV length are
torchat.vocabulary's; which backends refuse a quant scheme is torchat.quant.spec's. Standard library only.
"""

import json
import os
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from torchat.configs import KNOWN_CONFIGS
from torchat.errors import TorchatError, unknown_key_error
from torchat.pins import is_sha256, read_pins
from torchat.quant.spec import refusal, specs_from_dict, specs_to_json
from torchat.spec.names import GRAMMAR, canonical_name, check_backend, check_dtype, split_target_name
from torchat.vocabulary import BACKENDS, DEFAULT_MAX_SEQ_LEN, Backend, Device, Dtype

UNPINNED = "unpinned"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
# An fp32 target without quantization must evaluate as its eager baseline does, whatever backend runs it: its
# gate is this tight, whatever its preset allows for other dtypes
FP32_PARITY_PCT = 0.1


class Format(StrEnum):
    GGUF = "gguf"
    LLAMA2C = "llama2c"
    META = "meta"
    HF = "hf"
    TORCHAT = "torchat"


def targets_dir() -> Path:
    """$TORCHAT_TARGETS_DIR, else the checkout's targets/."""
    return Path(os.environ.get("TORCHAT_TARGETS_DIR") or REPO_ROOT / "targets").expanduser().resolve()


@dataclass(frozen=True)
class FileSpec:
    """One file of a model: a source string (see torchat.sources) and its pinned sha256 (None: unpinned)."""

    source: str
    sha256: str | None
    archive_sha256: str | None = None
    targets_dir: str = ""  # what a relative `path:` source is relative to, and where its pins.lock lives
    locked: bool = False   # the sha256 is pins.lock's (recorded on first use), not models.toml's

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
        """What enters the download's key: the same whether models.toml or pins.lock holds the pin."""
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
    # the quant JSON normalised as torchat.quant.spec normalises `--quant` (one spelling per option, defaults
    # filled in), in its file's order (schemes apply in order): two spellings of a preset give one key
    quant_json: str
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
    if not is_sha256(value):
        raise TorchatError(f"{where}: sha256 must be 64 lowercase hex digits or {UNPINNED!r}, got {value!r}")
    return value


def _check_fields(entry, allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise TorchatError(f"{where} has unknown field {unknown[0]!r}; the fields are: {', '.join(sorted(allowed))}")


MODEL_FIELDS = {"description", "config", "format", "source", "sha256", "archive_sha256", "tokenizer", "gated"}


def _model_spec(key: str, entry: dict, where: str, base: str, pins: dict[str, str]) -> ModelSpec:
    if not isinstance(entry, dict):
        raise TorchatError(f"{where}: [{key}] must be a table of {', '.join(sorted(MODEL_FIELDS))}")
    _check_fields(entry, MODEL_FIELDS, f"{where}: [{key}]")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
        raise TorchatError(f"{where}: model key {key!r} may hold only letters, digits, '.', '_' and '-'")

    def need(field):
        if field not in entry:
            raise TorchatError(f"{where}: [{key}] has no {field!r}; add it")
        return entry[field]

    def file_spec(source, digest, archive_sha256) -> FileSpec:
        sha = _sha(digest, f"{where}: [{key}]")
        locked = sha is None and source in pins
        return FileSpec(source, pins[source] if locked else sha, archive_sha256, base, locked)

    config = need("config")
    if config not in KNOWN_CONFIGS:
        raise TorchatError(f"{where}: [{key}] " + str(unknown_key_error("config", config, KNOWN_CONFIGS)))
    fmt = need("format")
    if fmt not in list(Format):
        raise TorchatError(f"{where}: [{key}] " + str(unknown_key_error("format", fmt, list(Format))))
    sources, digests = need("source"), need("sha256")
    sources = [sources] if isinstance(sources, str) else sources
    digests = [digests] if isinstance(digests, str) else digests
    if len(sources) != len(digests) or not sources:
        raise TorchatError(f"{where}: [{key}] needs one sha256 per source ({len(sources)} sources, "
                           f"{len(digests)} digests)")
    files = tuple(file_spec(s, d, entry.get("archive_sha256")) for s, d in zip(sources, digests))
    tok = entry.get("tokenizer", "embedded")
    if tok != "embedded" and not (isinstance(tok, dict) and "source" in tok and "sha256" in tok):
        raise TorchatError(f"{where}: [{key}] tokenizer must be \"embedded\" or {{source = ..., sha256 = ...}}")
    tokenizer = None if tok == "embedded" else file_spec(tok["source"], tok["sha256"], tok.get("archive_sha256"))
    model = ModelSpec(key, config, Format(fmt), files, tokenizer, bool(entry.get("gated", False)),
                      entry.get("description", ""))
    names = [f.name for f in model.all_files]
    if len(set(names)) != len(names):
        raise TorchatError(f"{where}: [{key}] has two files named alike ({names}); they share a directory")
    return model


PRESET_FIELDS = {"quant", "description", "max_degradation_pct"}


def _quant_preset(key: str, entry: dict, where: str) -> QuantPreset:
    if not isinstance(entry, dict) or not isinstance(entry.get("quant"), dict) or set(entry) - PRESET_FIELDS:
        raise TorchatError(f"{where}: [{key}] must hold `quant = {{...}}` (the quant JSON; {{}} for none) and "
                           "optionally `description` and `max_degradation_pct`, nothing else")
    bound = entry.get("max_degradation_pct")
    if bound is not None and not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound >= 0):
        raise TorchatError(f"{where}: [{key}] max_degradation_pct must be a number >= 0 (percent of word "
                           f"perplexity over the fp32 baseline), got {bound!r}")
    quant_json = specs_to_json(specs_from_dict(entry["quant"], f"{where}: [{key}]"))
    return QuantPreset(key, quant_json, entry.get("description", ""), None if bound is None else float(bound))


def _expand(value, universe, kind: str, where: str) -> list[str]:
    if value == "*":
        return list(universe)
    if not isinstance(value, list):
        raise TorchatError(f"{where}: [[matrix]] {kind}s must be \"*\" or a list, got {value!r}")
    for item in value:
        if item not in universe:
            raise TorchatError(f"{where}: " + str(unknown_key_error(kind, item, universe)))
    return list(value)


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


MATRIX_TABLES = {"defaults", "matrix", "eval"}
DEFAULTS_FIELDS = {"model", "device"}
MATRIX_FIELDS = {"models", "quants", "dtypes", "backends"}


class Targets:
    """The loaded targets directory: models, quant presets and the matrix, keyed by their name tokens."""

    def __init__(self, root: Path):
        self.root = root
        pins = read_pins(root)
        models = _read_toml(root / "models.toml")
        self.models = {k: _model_spec(k, v, str(root / "models.toml"), str(root), pins) for k, v in models.items()}
        quants = _read_toml(root / "quant.toml")
        self.quants = {k: _quant_preset(k, v, str(root / "quant.toml")) for k, v in quants.items()}
        # (preset, backend) -> (scheme, why) for the combinations whose numbers would be wrong
        self.refused = {(q, b): reason for q, preset in self.quants.items() for b in Backend
                        if (reason := refusal(specs_from_dict(preset.options), b))}
        where = str(root / "matrix.toml")
        matrix = _read_toml(root / "matrix.toml")
        _check_fields(matrix, MATRIX_TABLES, f"{where}: the file")
        defaults = matrix.get("defaults", {})
        _check_fields(defaults, DEFAULTS_FIELDS, f"{where}: [defaults]")
        device = defaults.get("device", Device.CPU)
        if device not in list(Device):
            raise TorchatError(f"{where}: [defaults] " + str(unknown_key_error("device", device, Device)))
        self.device = Device(device)
        self.max_seq_len = DEFAULT_MAX_SEQ_LEN  # the KV cache of exports (or the model's context, if shorter)
        self.eval_args = _eval_args(matrix.get("eval", {}), where)
        self.default_model = defaults.get("model", next(iter(self.models), ""))
        if self.default_model not in self.models:
            raise TorchatError(f"{where}: [defaults] " + str(unknown_key_error("model", self.default_model,
                                                                               self.models)))
        self.targets: dict[str, TargetSpec] = {}
        for entry in matrix.get("matrix", []):
            _check_fields(entry, MATRIX_FIELDS, f"{where}: [[matrix]]")
            for m in _expand(entry.get("models", "*"), self.models, "model", where):
                for q in _expand(entry.get("quants", "*"), self.quants, "quant preset", where):
                    for b in _expand(entry.get("backends", "*"), list(Backend), "backend", where):
                        backend = Backend(b)
                        dtypes = _expand(entry.get("dtypes", [BACKENDS[backend].default_dtype]), list(Dtype),
                                         "dtype", where)
                        for d in dtypes:  # what the backend refuses, the matrix leaves out
                            if (q, backend) not in self.refused and d in BACKENDS[backend].dtypes:
                                target = self.target(m, q, d, backend)
                                self.targets.setdefault(target.name, target)

    @property
    def default_dtype(self) -> dict[Backend, Dtype]:
        return {backend: info.default_dtype for backend, info in BACKENDS.items()}

    def target(self, model: str, quant: str, dtype: str | None, backend: str) -> TargetSpec:
        """The target of these keys; an unknown key lists the valid ones, a refused combination says why."""
        backend = check_backend(backend)
        dtype = check_dtype(dtype, backend)
        if quant not in self.quants:
            raise unknown_key_error("quant preset", quant, self.quants)
        if model not in self.models:
            raise unknown_key_error("model", model, self.models)
        if (quant, backend) in self.refused:
            scheme, why = self.refused[quant, backend]
            allowed = sorted(q for q in self.quants if (q, backend) not in self.refused)
            raise TorchatError(f"quant preset {quant!r} is refused for backend {backend} ({scheme}: {why}); "
                               f"choose one of: {', '.join(allowed)}")
        return TargetSpec(self.models[model], self.quants[quant], dtype, backend,
                          canonical_name(model, quant, dtype, backend))

    def parse_target(self, name: str) -> TargetSpec:
        """`MODEL-QUANT[-DTYPE]-BACKEND`, parsed from the right; no fuzzy matching."""
        try:
            return self.target(*split_target_name(name, self.models, self.quants))
        except TorchatError as error:
            raise TorchatError(f"target {name!r} ({GRAMMAR}): {error}") from None

    def model(self, key: str) -> ModelSpec:
        if key not in self.models:
            raise unknown_key_error("model", key, self.models)
        return self.models[key]

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
