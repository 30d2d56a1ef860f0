"""Text that names code must name code that exists: the CLI docstring's command list is the parser's, and the
kernels' docstring (kernels/aot.py) names files, functions and README sections that are there."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from pathlib import Path

from doc_pages import documentation  # noqa: E402

import ivl_fast.cli as cli
import ivl_fast.ops as ops

ROOT = Path(__file__).resolve().parents[1]


def _doc_commands(doc: str) -> list[str]:
    """The ``- ``name``: ...`` bullets of the docstring's "Subcommands" paragraph, in order."""
    block = doc.split("Subcommands", 1)[1].split("\n\n", 2)[1]  # the paragraph after the intro sentence
    lines = block.strip().splitlines()
    names = [re.fullmatch(r"- ``([a-z][a-z0-9-]*)``: \S.*", line) for line in lines]
    assert all(names), f"not a '- ``command``: what it does' line: {lines[names.index(None)]!r}"
    return [m.group(1) for m in names]


def _parser_commands() -> list[str]:
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_cli_docstring_lists_exactly_the_registered_subcommands():
    assert _doc_commands(cli.__doc__) == _parser_commands()


def test_each_subcommand_has_its_module():
    for name in _parser_commands():
        mod = importlib.import_module(f"ivl_fast.cli.{name.replace('-', '_')}")
        assert callable(mod.add_parser) and callable(mod.run), name


def test_doc_commands_parser_refuses_a_stale_list():
    doc = cli.__doc__
    assert _doc_commands(doc.replace("- ``demo``: the paper's transfer table in miniature\n", "")) != (
        _parser_commands()
    )
    extra = doc.replace("- ``make-tiny``:", "- ``serve``: an HTTP server\n- ``make-tiny``:")
    assert _doc_commands(extra) != _parser_commands()


def _resolves(dotted: str) -> bool:
    """``a.b.c`` names a module or an attribute of one."""
    mod, _, attr = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(mod), attr) or bool(importlib.import_module(dotted))
    except ImportError:
        return False


def _top_level_names(path: Path) -> set[str]:
    """Functions, classes and assigned names at the top of a module, read without importing it (no triton)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_kernels_docstring_names_what_exists():
    # read from the checkout's file (ivl_fast.kernels is installed from kernels/)
    init = ROOT / "kernels" / "aot.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree)
    (modules,) = [
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["KERNEL_MODULES"]
    ]
    assert "shared/" not in doc
    defined = _top_level_names(init) | set(dir(ops))
    for mod_name in modules:
        assert f"``{mod_name}.py``" in doc, mod_name
        defined |= _top_level_names(ROOT / "kernels" / f"{mod_name}.py")
    named = set(re.findall(r"``([A-Za-z_][A-Za-z0-9_.]*)``", doc)) - {f"{m}.py" for m in modules}
    assert named, "the pattern finds no names: the test would check nothing"
    for name in named:
        ok = _resolves(name) if name.startswith("ivl_fast.") else name in defined
        assert ok, f"kernels/aot.py names {name!r}, which does not exist"
    readme_sections = set(re.findall(r"^##? (.+)$", documentation(), re.M))
    cited = re.findall(r'"([A-Z][A-Za-z ]+)"', doc)
    assert cited and all(c in readme_sections for c in cited), (cited, readme_sections)
    paths = re.findall(r"\b(?:tests|ivl_fast|kernels)/[\w/]+\.py\b", doc)
    assert paths and all((ROOT / p).is_file() for p in paths), paths
