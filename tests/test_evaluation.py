"""torchat eval: the lm-eval adapter against direct computations from the model's logits, the same perplexity from
every model form, the offline task, and the quality gate of `doit eval:` failing a broken preset.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_model import TINY_CONTEXT, checkpoint_transformer

from torchat.cli import main
from torchat.errors import TorchatError
from torchat.evaluation import evaluate
from torchat.evaluation.tasks import DEFAULT_LIMIT, DOC_WORDS, evaluation_documents, write_documents
from torchat.generate import EagerModel, Sampling, generate

# the shared tiny checkpoint's model and its KV cache: windows of 96 tokens, so that each document rolls
MAX_SEQ_LEN = TINY_CONTEXT


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


class CountingModel:
    """A TextModel that records each forward call's positions."""

    def __init__(self, model):
        self.inner, self.calls = model, []
        self.max_seq_len, self.device = model.max_seq_len, model.device

    def forward(self, tokens, input_pos):
        self.calls.append(input_pos.tolist())
        return self.inner.forward(tokens, input_pos)


def reference_log_likelihood(model, ids: list[int], prefix: int, window: int) -> float:
    """log p(ids) from plain causal passes (no KV cache), wikitext-style: windows of `window` predicted tokens,
    each token predicted from at most `window` tokens before it (the prefix token standing before the first)."""
    preceded = [prefix] + ids
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            end = min(start + window, len(ids))
            logits = model(torch.tensor([preceded[max(0, end - window):end]]))[0, -(end - start):].float()
            total -= F.cross_entropy(logits, torch.tensor(ids[start:end]), reduction="sum").item()
    return total


def test_perplexity_equals_a_direct_computation_from_the_logits(tokenizer, tmp_path):
    """Word/byte perplexity and bits per byte through lm-eval and the adapter, against the definitions computed
    here from the logits of an independent, cache-free pass; windows of 96 tokens make each document roll."""
    counting = CountingModel(EagerModel(checkpoint_transformer(), MAX_SEQ_LEN))
    result = evaluate(counting, tokenizer, ["botchan"], limit=2, cache=tmp_path)
    reference = checkpoint_transformer()  # the same seed: the same weights, no cache
    docs = evaluation_documents()[:2]
    log_likelihood = sum(reference_log_likelihood(reference, tokenizer.encode_text(doc), tokenizer.bos_id,
                                                  MAX_SEQ_LEN) for doc in docs)
    words = sum(len(re.split(r"\s+", doc)) for doc in docs)
    size = sum(len(doc.encode()) for doc in docs)
    metrics = result["results"]["botchan"]
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-log_likelihood / words), rel=1e-4)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-log_likelihood / size), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(-log_likelihood / size / math.log(2), rel=1e-4)
    tokens = sum(len(tokenizer.encode_text(doc)) for doc in docs)
    assert result["tokens"] == tokens and result["samples"] == {"botchan": 2}
    # each window is prefilled in one call from position 0, and fits the cache
    assert len(counting.calls) == sum(math.ceil(len(tokenizer.encode_text(d)) / MAX_SEQ_LEN) for d in docs)
    assert all(call == list(range(len(call))) and len(call) <= MAX_SEQ_LEN for call in counting.calls)


def test_loglikelihood_and_greedy_flag_against_the_logits(tokenizer):
    from torchat.evaluation.adapter import TorchatLM

    lm = TorchatLM(EagerModel(checkpoint_transformer(), MAX_SEQ_LEN), tokenizer)
    reference = checkpoint_transformer()
    context = tokenizer.encode_text("The school was a long way from the station")
    with torch.no_grad():  # the greedy continuation, one token at a time from full passes
        greedy = []
        for _ in range(4):
            greedy.append(int(reference(torch.tensor([context + greedy]))[0, -1].argmax()))
        logits = reference(torch.tensor([context + greedy]))[0].float()
    expected = F.log_softmax(logits, -1)[len(context) - 1:-1].gather(-1, torch.tensor(greedy)[:, None]).sum()
    other = greedy[:3] + [(greedy[3] + 1) % tokenizer.vocab_size]
    (score, is_greedy), (_, other_greedy) = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert score == pytest.approx(float(expected), rel=1e-5) and is_greedy and not other_greedy
    # a context longer than the window is cut from the left: the last window's score
    long_context = tokenizer.encode_text(evaluation_documents()[0])[:100]
    (cut,) = lm._loglikelihood_tokens([(None, long_context, greedy)])
    (kept,) = lm._loglikelihood_tokens([(None, long_context[-(MAX_SEQ_LEN + 1 - len(greedy)):], greedy)])
    assert cut == kept


def test_string_requests_go_through_lm_evals_encoding(tokenizer):
    from lm_eval.api.instance import Instance

    from torchat.evaluation.adapter import TorchatLM

    lm = TorchatLM(EagerModel(checkpoint_transformer(), MAX_SEQ_LEN), tokenizer)
    request = Instance("loglikelihood", {}, ("I went to the", " school"), 0)
    ((score, _),) = lm.loglikelihood([request])
    context, continuation = lm._encode_pair("I went to the", " school")
    assert context + continuation == tokenizer.encode_text("I went to the school")
    assert score == lm._loglikelihood_tokens([(None, context, continuation)])[0][0]


def test_generate_until_is_torchat_generate_cut_at_the_stop_string(tokenizer):
    from lm_eval.api.instance import Instance

    from torchat.evaluation.adapter import TorchatLM

    model = EagerModel(checkpoint_transformer(), MAX_SEQ_LEN)
    prompt = "The head teacher said"
    ids = list(generate(model, tokenizer.encode_text(prompt), 12, Sampling(), tokenizer.stop_ids))
    full = tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids])
    assert len(full) > 4
    stop = full[len(full) // 2:len(full) // 2 + 2]
    lm = TorchatLM(model, tokenizer)
    requests = [Instance("generate_until", {}, (prompt, {"until": ["\u2603"], "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 1),
                Instance("generate_until", {}, (prompt, {"max_gen_toks": 12}), 2)]
    assert lm.generate_until(requests) == [full, full.split(stop)[0], full]


def test_documents_are_the_evaluation_split_in_order_and_cached_by_content(tmp_path):
    from torchat.quant.calibration import split_english_text

    calibration, evaluation = split_english_text()
    docs = evaluation_documents()
    assert "\n".join(docs) == evaluation
    assert all(len(doc.split()) >= DOC_WORDS for doc in docs)
    assert not set(calibration.splitlines()[-50:]) & set(evaluation.splitlines()[:50])
    path = write_documents(docs, tmp_path, "botchan")
    assert path.is_absolute() and write_documents(docs, tmp_path, "botchan") == path
    assert [json.loads(line)["page"] for line in path.read_text().splitlines()] == docs
    assert write_documents(docs[:1], tmp_path, "botchan") != path


def test_the_verse_task_is_macbeth_in_documents_of_whole_lines(tmp_path):
    """The second local text is verse (pinned by sha256 in torchat.assets), cut as Botchan is; both are defaults."""
    from torchat.assets import verse_text
    from torchat.evaluation.tasks import DEFAULT_TASKS, LOCAL_TASKS, split_documents

    text = verse_text()
    docs = split_documents(text)
    assert "\n".join(docs) == text and text.startswith("ACT I.") and "Fair is foul, and foul is fair" in docs[0]
    assert all(len(doc.split()) >= DOC_WORDS for doc in docs) and len(docs) > 2 * DEFAULT_LIMIT
    task = LOCAL_TASKS["shakespeare"](tmp_path)
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert task["task"] == "shakespeare" and [json.loads(line)["page"] for line in data.read_text().splitlines()] == docs
    assert set(DEFAULT_TASKS) == {"botchan", "shakespeare"}


def test_the_cli_writes_eval_json_and_the_same_perplexity_from_every_exported_form(tiny_checkpoint, tiny_artifacts,
                                                                                 tmp_path, capsys):
    """Eager, .pt2, .so and .pte of one fp32 model: the same perplexity (relative difference <= 1e-3)."""
    common = ["--limit", "2", "--max-seq-length", str(MAX_SEQ_LEN)]
    results = {}
    for form, flags in [("eager", ["--checkpoint-dir", str(tiny_checkpoint)]),
                        (".pt2", ["--aoti-package-path", str(tiny_artifacts[".pt2"])]),
                        (".so", ["--dso-path", str(tiny_artifacts[".so"])]),
                        (".pte", ["--pte-path", str(tiny_artifacts[".pte"])])]:
        out = tmp_path / form
        assert main(["eval", *flags, *common, "--output-dir", str(out)]) == 0
        results[form] = json.loads((out / "eval.json").read_text())
    table = capsys.readouterr().out
    assert "| botchan |" in table
    eager = results["eager"]["results"]["botchan"]
    for form in (".pt2", ".so", ".pte"):
        assert results[form]["settings"] == results["eager"]["settings"]
        for metric, value in results[form]["results"]["botchan"].items():
            assert value == pytest.approx(eager[metric], rel=1e-3), (form, metric)
    assert results[".pte"]["model"]["backend"] == "et" and results["eager"]["model"]["backend"] == "eager"


def test_the_gate_fails_with_the_increase_and_the_bound(tiny_checkpoint, tmp_path, capsys):
    base = tmp_path / "base"
    common = ["--checkpoint-dir", str(tiny_checkpoint), "--limit", "1", "--max-seq-length", str(MAX_SEQ_LEN)]
    assert main(["eval", *common, "--output-dir", str(base)]) == 0
    fake = json.loads((base / "eval.json").read_text())
    fake["results"]["botchan"]["word_perplexity"] /= 1.25  # the model now looks 25 % worse than this baseline
    (base / "eval.json").write_text(json.dumps(fake))
    capsys.readouterr()
    rc = main(["eval", *common, "--baseline-dir", str(base), "--max-degradation-pct", "10", "--label", "tiny"])
    captured = capsys.readouterr()
    assert rc == 1
    assert re.search(r"tiny fails its quality gate: botchan word perplexity \S+ is \+25\.0 % over fp32 \(\S+\), "
                     r"bound \+10\.0 %", captured.err)
    assert "| FAIL |" in captured.out and "| baseline |" in captured.out
    assert main(["eval", *common, "--baseline-dir", str(base), "--max-degradation-pct", "30"]) == 0
    other = ["--checkpoint-dir", str(tiny_checkpoint), "--limit", "2", "--max-seq-length", str(MAX_SEQ_LEN)]
    assert main(["eval", *other, "--baseline-dir", str(base)]) == 1
    assert "evaluate both the same way" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_eager_gives_the_eager_perplexity(tiny_checkpoint, tmp_path):
    """--compile (torch.compile with dynamic shapes: every window length shares a graph); slow: inductor's C++
    compile takes a minute or more on a loaded CPU."""
    results = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert main(["eval", "--checkpoint-dir", str(tiny_checkpoint), "--limit", "1", "--max-seq-length",
                     str(MAX_SEQ_LEN), "--output-dir", str(tmp_path / name), *extra]) == 0
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert results["compiled"]["model"]["compile"] and not results["eager"]["model"]["compile"]
    for metric, value in results["compiled"]["results"]["botchan"].items():
        assert value == pytest.approx(results["eager"]["results"]["botchan"][metric], rel=1e-4), metric


def test_usage_mistakes_are_one_line(tiny_checkpoint, capsys):
    for flags, message in [(["--limit", "1.5"], "--limit '1.5'"), (["--artifact-dir", "x", "--backend", "tpu"],
                                                                   "invalid choice: 'tpu'")]:
        with pytest.raises(SystemExit) as refused:  # while parsing
            main(["eval", "--checkpoint-dir", str(tiny_checkpoint), *flags])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and message in err and err.count("\n") == 1, err
    for flags, message in [(["--max-degradation-pct", "5"], "--max-degradation-pct needs --baseline-dir"),
                           (["--artifact-dir", "x"], "--artifact-dir needs --backend, one of")]:
        assert main(["eval", "--checkpoint-dir", str(tiny_checkpoint), *flags]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_window_longer_than_the_cache_is_refused(tokenizer):
    from torchat.evaluation.adapter import TorchatLM

    with pytest.raises(TorchatError, match=f"beyond the model's KV cache of {MAX_SEQ_LEN}"):
        TorchatLM(EagerModel(checkpoint_transformer(), MAX_SEQ_LEN), tokenizer, max_length=MAX_SEQ_LEN + 16)


# --- the build graph: `doit eval:` with the real verbs on a small random model ------------------------------

def test_eval_nodes_read_the_fp32_baseline_and_carry_the_presets_bound(tmp_path):
    from test_store import write_tiny_targets

    from torchat import spec

    root = write_tiny_targets(tmp_path / "targets")
    (root / "quant.toml").write_text('[none]\nquant = {}\nmax_degradation_pct = 2\n\n'
                                     '[q8]\nquant = { "linear:int8" = { groupsize = 0 } }\nmax_degradation_pct = 4.5\n')
    catalog = spec.load_catalog(root)

    def node(name):
        return catalog.node_for(spec.Step.EVAL, name)

    def value(n, flag):
        return n.args[n.args.index(flag) + 1] if flag in n.args else None

    baseline = node("alpha-none-fp32-eager")
    assert [role for role, _ in baseline.deps] == ["model", "checkpoint"] and "--baseline-dir" not in baseline.args
    quantized = node("alpha-q8-aoti")
    assert dict(quantized.deps)["baseline"] is baseline
    assert value(quantized, "--max-degradation-pct") == "4.5" and value(quantized, "--label") == "alpha-q8-aoti"
    assert value(quantized, "--max-seq-length") == value(baseline, "--max-seq-length") == "256"
    assert value(node("alpha-none-aoti"), "--max-degradation-pct") == "2"       # bf16: the preset's bound
    assert value(node("alpha-none-fp32-aoti"), "--max-degradation-pct") == "0.1"  # fp32: parity
    assert "eval:alpha-none-fp32-eager" in subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(spec.REPO_ROOT / "dodo.py"), "list", "--all"],
        env={**os.environ, "TORCHAT_TARGETS_DIR": str(root)}, capture_output=True, text=True).stdout


@pytest.mark.parametrize("quant_toml, message", [
    ('[none]\nquant = {}\nmax_degradation_pct = "5 %"\n', "max_degradation_pct must be a number >= 0"),
    ('[none]\nquant = {}\nmax_degradation_pct = -1\n', "max_degradation_pct must be a number >= 0"),
    ('[q8]\nquant = { "linear:int8" = { groupsize = 0 } }\n', "no preset with `quant = {}`"),
])
def test_bad_bounds_and_a_missing_baseline_preset_are_named(tmp_path, quant_toml, message):
    from test_store import write_tiny_targets

    from torchat import spec

    root = write_tiny_targets(tmp_path / "targets")
    (root / "quant.toml").write_text(quant_toml)
    with pytest.raises(TorchatError, match=re.escape(message)):
        spec.load_catalog(root).nodes(spec.Step.EVAL)


def _random_stories15m(path: Path, std: float = 0.1) -> None:
    """A stories15M-shaped llama2.c checkpoint with weights large enough that quantization shows."""
    from torchat.checkpoint.base import expected_shapes
    from torchat.configs import KNOWN_CONFIGS
    from torchat.model import ModelArgs

    args = ModelArgs(**KNOWN_CONFIGS["stories15M"])
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.ones(shape) if "norm" in k else torch.randn(shape, generator=generator) * std
                  for k, shape in expected_shapes(args).items()}
    torch.save({"model": state_dict, "model_args": {"dim": 288, "n_layers": 6, "n_heads": 6, "n_kv_heads": 6,
                                                    "vocab_size": 32000, "max_seq_len": 256}}, path)


def _gate_targets(root: Path, tokenizer_model: Path) -> None:
    from torchat import store

    root.mkdir()
    _random_stories15m(root / "tiny.pt")
    shutil.copy(tokenizer_model, root / "tokenizer.model")
    (root / "models.toml").write_text(
        f'[tiny]\nconfig = "stories15M"\nformat = "llama2c"\nsource = "path:tiny.pt"\n'
        f'sha256 = "{store.sha256_file(root / "tiny.pt")}"\n'
        f'tokenizer = {{ source = "path:tokenizer.model", sha256 = "{store.sha256_file(tokenizer_model)}" }}\n')
    (root / "quant.toml").write_text(
        '[none]\nquant = {}\nmax_degradation_pct = 5\n\n'
        '# about the coarsest quantization the registry accepts: int4 linears in groups of 256, an int4 embedding\n'
        '[broken]\nquant = { "linear:int4" = { groupsize = 256 }, embedding = { bitwidth = 4, groupsize = 32 } }\n'
        'max_degradation_pct = 1\n')
    (root / "matrix.toml").write_text(
        '[defaults]\nmodel = "tiny"\n[eval]\nlimit = 1\n'
        '[[matrix]]\nmodels = "*"\nquants = "*"\nbackends = ["eager"]\n')


def _doit(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """doit in a subprocess, as test_dodo runs it, with room for real evals on a loaded machine."""
    from test_dodo import doit_command

    result = subprocess.run(doit_command(env, *args), env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=900)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_doit_eval_fails_a_broken_preset_and_stores_the_passing_ones(tmp_path, mistral_sentencepiece):
    from test_dodo import copy_repo, ran
    from test_store import graph_env

    from torchat import store

    doit = _doit
    _gate_targets(tmp_path / "targets", mistral_sentencepiece)
    repo = copy_repo(tmp_path / "repo")
    env = {k: v for k, v in graph_env(tmp_path).items() if k != "TORCHAT_STEP_CLI"} | {"PYTHONPATH": str(repo)}

    broken = doit(env, "eval:tiny-broken-fp32-eager", check=False)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    message = re.search(r"tiny-broken-fp32-eager fails its quality gate: botchan word perplexity \S+ is "
                        r"\+(\d+\.\d) % over fp32 \(\S+\), bound \+1\.0 %", broken.stderr)
    assert message and float(message.group(1)) > 1.0, broken.stderr
    assert "eval:tiny-broken-fp32-eager was not built" in broken.stderr
    # the baseline was evaluated once and stored, with its manifest; the failed eval was not
    (baseline,) = [d for d in (tmp_path / "artifacts" / "eval").iterdir() if not d.name.startswith(".")]
    assert baseline.name.endswith("-tiny-none-fp32-eager") and store.check_artifact(baseline)
    assert json.loads((baseline / "eval.json").read_text())["results"]["botchan"]["word_perplexity"] > 1

    passing = doit(env, "eval:tiny-none-eager")  # bf16: within the preset's 5 %
    assert ran(passing) == {"quantize:tiny-none-bf16", "eval:tiny-none-eager"}
    assert "| tiny-none-eager | botchan |" in passing.stdout and "| pass |" in passing.stdout
    assert ran(doit(env, "eval:tiny-none-eager")) == set()
    # a failed gate is never recorded as done
    assert "eval:tiny-broken-fp32-eager" in ran(doit(env, "eval:tiny-broken-fp32-eager", check=False))

    table = subprocess.run([sys.executable, "-m", "torchat", "eval", "--table"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "| tiny-none-eager |" in table.stdout and "| tiny-none-fp32-eager |" in table.stdout


# --- SmolLM2: the fp32 exports evaluate as the eager model ----------------------------------------------------

SMOLLM2_WINDOW = 128  # tokens per forward call, within every form's KV cache


@pytest.mark.slow
def test_smollm2_fp32_pt2_and_pte_give_the_eager_perplexity(smollm2_gguf, smollm2_artifact, tmp_path):
    """SmolLM2 eager, .pt2 and .pte (fp32, the build graph's artifacts from the store): relative difference of each
    metric <= 1e-3 on one document (about 600 tokens, five windows of 128)."""
    common = ["--limit", "1", "--max-seq-length", str(SMOLLM2_WINDOW)]
    forms = {"eager": ["--gguf-path", str(smollm2_gguf)]}
    for suffix, flag in ((".pt2", "--aoti-package-path"), (".pte", "--pte-path")):
        forms[suffix] = [flag, str(smollm2_artifact(suffix))]
    results = {}
    for form, flags in forms.items():
        assert main(["eval", *flags, *common, "--output-dir", str(tmp_path / form)]) == 0
        results[form] = json.loads((tmp_path / form / "eval.json").read_text())["results"]["botchan"]
    print(json.dumps(results, indent=1))
    for form in (".pt2", ".pte"):
        for metric, value in results[form].items():
            assert value == pytest.approx(results["eager"][metric], rel=1e-3), (form, metric)
