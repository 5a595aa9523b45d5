"""The import directions of STYLE.md, read from the source (AST) of whatever modules exist.

- The library (torchat/) never imports dodo, doit or targets.
- The core never imports the CLI: nothing outside torchat/cli imports torchat.cli (torchat/__main__.py, the entry
  point, may), and only torchat/cli imports argparse, so no namespace travels below the verbs.
- model.py imports torch and the standard library only.
- the spec package and store.py, and every torchat module they import at import time, use the standard library
  only; dodo.py imports torchat.spec and torchat.store (and the standard library, and doit).
- lowering -> quant -> model, never back: quant never imports lowering, model neither.
- generate (and everything it imports, at any depth) never imports lowering.
"""

import ast
import sys
from pathlib import Path

import pytest

from torchat import spec

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in sorted((ROOT / "torchat").rglob("*.py")) if "__pycache__" not in p.parts}


def _nodes(tree: ast.AST, at_import_time: bool):
    for node in ast.iter_child_nodes(tree):
        if at_import_time and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        yield from _nodes(node, at_import_time)


def imports(path: Path, at_import_time: bool = False) -> set[str]:
    """Absolute names of the modules `path` imports (only those run at import time, if asked)."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text()), at_import_time):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def closure(start: list[str], at_import_time: bool, through: set[str] | None = None) -> set[str]:
    """The torchat modules reachable from `start` through imports (only through the modules `through` allows)."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        if through is not None and name not in through:
            continue
        todo += [m for m in imports(MODULES[name], at_import_time) if m.split(".")[0] == "torchat"]
        todo += [name.rpartition(".")[0]] if "." in name else []  # importing a submodule runs its package
    return seen


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_library_never_imports_the_graph(module):
    assert not {m for m in imports(MODULES[module]) if top(m) in ("dodo", "doit", "targets")}


def test_model_imports_torch_only():
    assert {top(m) for m in imports(MODULES["torchat.model"])} <= STDLIB | {"torch"}


def in_cli(name: str) -> bool:
    return name == "torchat.cli" or name.startswith("torchat.cli.")


def cli_imports_outside_the_cli() -> dict[str, set[str]]:
    """Core module -> the CLI modules it imports (at any depth of its code, lazily too)."""
    found = {}
    for name, path in MODULES.items():
        if not in_cli(name) and name != "torchat.__main__":
            if cli := {m for m in imports(path) if in_cli(m)}:
                found[name] = cli
    return found


def argparse_outside_the_cli() -> set[str]:
    return {name for name, path in MODULES.items() if not in_cli(name) and "argparse" in imports(path)}


def test_the_core_never_imports_the_cli():
    assert cli_imports_outside_the_cli() == {}, "move what the core needs out of torchat/cli"


def test_only_the_cli_imports_argparse():
    assert argparse_outside_the_cli() == set(), "library functions take values, not argparse namespaces"


def test_the_cli_checks_catch_a_core_module_that_imports_the_cli(tmp_path, monkeypatch):
    files = {"__init__.py": "", "__main__.py": "from torchat.cli import main\n",
             "cli/__init__.py": "import argparse\n", "cli/flags.py": "import argparse\nfrom torchat import loader\n",
             "loader.py": "def f():\n    from .cli import flags\n",
             "quant/__init__.py": "", "quant/spec.py": "from torchat import cli\nimport argparse\n",
             "model.py": "import torch\n"}
    for name, text in files.items():
        (tmp_path / "torchat" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "torchat" / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    fake = {module_of(p): p for p in (tmp_path / "torchat").rglob("*.py")}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert cli_imports_outside_the_cli() == {"torchat.loader": {"torchat.cli", "torchat.cli.flags"},
                                             "torchat.quant.spec": {"torchat.cli"}}
    assert argparse_outside_the_cli() == {"torchat.quant.spec"}


SPEC = sorted(m for m in MODULES if m == "torchat.spec" or m.startswith("torchat.spec."))


def test_spec_and_store_need_the_standard_library_only():
    reached = closure(["torchat.spec", "torchat.store"], at_import_time=True)
    assert {*SPEC, "torchat.store", "torchat.errors"} <= reached
    for name in reached:
        outside = {m for m in imports(MODULES[name], at_import_time=True) if top(m) not in STDLIB | {"torchat"}}
        assert not outside, f"{name} imports {outside} at import time; `doit list` must stay free of them"
    for name in [*SPEC, "torchat.store"]:  # not even lazily
        assert {top(m) for m in imports(MODULES[name])} <= STDLIB | {"torchat"}, name
    assert not {m for m in reached if in_cli(m)}, "the graph names a verb's module by path, never imports it"


def test_dodo_imports_spec_and_store_only():
    torchat_imports = {m for m in imports(ROOT / "dodo.py") if top(m) == "torchat"}
    assert torchat_imports <= {"torchat", "torchat.spec", "torchat.store"}
    assert {top(m) for m in imports(ROOT / "dodo.py")} <= STDLIB | {"torchat", "doit"}


def test_quant_never_imports_lowering_and_model_neither():
    for name in [m for m in MODULES if m.startswith("torchat.quant")] + ["torchat.model"]:
        assert not {m for m in imports(MODULES[name]) if m.startswith("torchat.lowering")}, name
    assert not {m for m in closure(["torchat.model"], False) if m.startswith(("torchat.quant", "torchat.lowering"))}


def test_generate_never_imports_lowering():
    start = [m for m in MODULES if m.startswith("torchat.generate")]
    assert start
    reached = closure(start, at_import_time=False)
    assert not {m for m in reached if m.startswith("torchat.lowering")}, sorted(reached)


def test_the_scanner_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    package = tmp_path / "torchat" / "quant"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "int4.py").write_text("from . import base\nfrom ..lowering import aoti\ndef f():\n    import doit\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setitem(MODULES, "torchat.quant.base", package / "base.py")
    assert {"torchat.quant", "torchat.quant.base", "torchat.lowering", "doit"} <= imports(package / "int4.py")
    assert "doit" not in imports(package / "int4.py", at_import_time=True)


# the CLI's dispatch, the graph, the publishing and the fetching plumbing: every verb reaches them, none of them
# shapes a step's output. torchat.threads: the CLI's process set-up for a .pte (OpenMP's thread count), which
# changes speed, not results
PLUMBING = {"torchat", "torchat.cli", "torchat.errors", *SPEC, "torchat.store", "torchat.publish", "torchat.pins",
            "torchat.sources", "torchat.assets", "torchat.threads", "torchat.quiet"}


@pytest.mark.parametrize("step", [s for s in spec.STEPS if s != spec.Step.DOWNLOAD])
def test_each_steps_declared_code_covers_what_its_verb_imports(step):
    """spec.STEPS lists the code whose digest enters a step's key; a module missing there would let an edit
    leave a stale artifact looking current."""
    info = spec.STEPS[step]
    assert spec.verb_code_path(info.verb) == info.module
    assert (ROOT / info.module).is_file(), f"`torchat {info.verb}`: no module {info.module}"
    declared = (*info.code, info.module)
    # plumbing is not followed: what it imports (threads -> the ExecuTorch pool) serves the process, not the step
    reached = closure([module_of(ROOT / info.module)], at_import_time=False, through=set(MODULES) - PLUMBING
                      | {"torchat.cli"})
    for name in reached - PLUMBING:
        path = MODULES[name].relative_to(ROOT).as_posix()
        assert any(path == p or path.startswith(p + "/") for p in declared), (
            f"`torchat {info.verb}` runs {name}; add {path} (or its package) to STEPS[{step}].code in "
            "torchat/spec/graph.py")
