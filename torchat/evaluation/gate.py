"""The quality gate: a target's perplexity against the fp32 eager baseline of the same model, and the tables.

A target passes when, on every perplexity task, its word perplexity exceeds the baseline's by at most the bound
its quant preset declares (targets/quant.toml `max_degradation_pct`). Both results must come from the same
settings (tasks, documents, window length): otherwise the comparison would measure the settings.
"""

import json
from pathlib import Path

from torchat.errors import TorchatError

RESULT_FILE = "eval.json"
GATE_METRIC = "word_perplexity"


def read_result(path: Path) -> dict:
    """An eval.json (or the directory holding one)."""
    path = Path(path)
    path = path / RESULT_FILE if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TorchatError(f"{path}: missing; evaluate the baseline first (`torchat eval ... --output-dir`)") from None
    except json.JSONDecodeError as error:
        raise TorchatError(f"{path}: not valid JSON ({error}); evaluate it again") from None


def compare(result: dict, baseline: dict, bound_pct: float | None) -> dict:
    """The gate's verdict: {"metric", "bound_pct", "checks": [{"task", "value", "baseline", "increase_pct",
    "passed"}], "passed"}. bound_pct None reports the increase and passes."""
    if result["settings"] != baseline["settings"]:
        raise TorchatError(f"the baseline {baseline.get('label', '')} was evaluated with {baseline['settings']}, "
                           f"this model with {result['settings']}; evaluate both the same way")
    checks = []
    for task, metrics in result["results"].items():
        if GATE_METRIC in metrics and GATE_METRIC in baseline["results"].get(task, {}):
            value, base = metrics[GATE_METRIC], baseline["results"][task][GATE_METRIC]
            increase = (value / base - 1) * 100
            checks.append({"task": task, "value": value, "baseline": base, "increase_pct": increase,
                           "passed": bound_pct is None or increase <= bound_pct})
    if not checks:
        raise TorchatError(f"none of the tasks {sorted(result['results'])} reports {GATE_METRIC}, which the gate "
                           "compares; add a perplexity task (botchan)")
    return {"metric": GATE_METRIC, "bound_pct": bound_pct, "checks": checks,
            "passed": all(check["passed"] for check in checks)}


def failure_message(label: str, gate: dict) -> str:
    """One line naming each failing task, by how much it is over, and the bound."""
    failed = [c for c in gate["checks"] if not c["passed"]]
    assert failed, gate
    parts = [f"{c['task']} {gate['metric'].replace('_', ' ')} {c['value']:.4g} is {c['increase_pct']:+.1f} % over "
             f"fp32 ({c['baseline']:.4g}), bound {gate['bound_pct']:+.1f} %" for c in failed]
    return f"{label} fails its quality gate: " + "; ".join(parts)


def table_rows(result: dict) -> list[list[str]]:
    """One row per task of an eval result: label, task, metrics, and the gate's columns."""
    checks = {c["task"]: c for c in (result.get("gate") or {}).get("checks", [])}
    bound = (result.get("gate") or {}).get("bound_pct")
    rows = []
    for task, metrics in result["results"].items():
        check = checks.get(task)
        perplexity = [f"{metrics[m]:.4f}" if m in metrics else "" for m in
                      ("word_perplexity", "byte_perplexity", "bits_per_byte")]
        others = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()
                           if m not in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
        if check is None:
            verdict, increase, bound_text = ("baseline" if result.get("gate") is None else ""), "", ""
        else:
            verdict = "pass" if check["passed"] else "FAIL"
            increase = f"{check['increase_pct']:+.3f} %"
            bound_text = "none" if bound is None else f"+{bound:g} %"
        rows.append([result.get("label", ""), task, *perplexity, others, increase, bound_text, verdict])
    return rows


TABLE_HEADER = ["target", "task", "word ppl", "byte ppl", "bits/byte", "other metrics", "vs fp32", "bound", "gate"]


def render_table(rows: list[list[str]]) -> str:
    """A Markdown table; columns that are empty in every row are left out."""
    keep = [i for i in range(len(TABLE_HEADER)) if any(row[i] for row in rows)]
    lines = ["| " + " | ".join(TABLE_HEADER[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]
    return "\n".join(lines)


def store_table_rows() -> list[list[str]]:
    """The newest eval artifact of each name in the store, as table rows."""
    from torchat import store

    newest = {}
    for directory, manifest in store.artifacts("eval"):
        if (directory / RESULT_FILE).is_file() and manifest.get("created", "") >= newest.get(
                manifest["name"], ("", None))[0]:
            newest[manifest["name"]] = (manifest.get("created", ""), directory)
    if not newest:
        raise TorchatError(f"no eval results in {store.artifacts_dir()}; run `doit eval:TARGET` first")
    return [row for name in sorted(newest) for row in table_rows(read_result(newest[name][1]))]
