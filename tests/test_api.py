"""The package's public API: every exported name resolves, and editors see the same names."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import circuits


def test_every_export_resolves_to_the_object_in_its_module():
    assert circuits.__all__ == ["__version__", *circuits._EXPORTS]
    for name, module in circuits._EXPORTS.items():
        assert getattr(circuits, name) is getattr(importlib.import_module(module), name), name


def test_type_checking_imports_name_the_same_modules_as_the_lazy_exports():
    tree = ast.parse(Path(circuits.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == circuits._EXPORTS


def test_import_graph_has_no_loop_between_folders_and_at_most_seven_floors():
    script = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"
    out = subprocess.run([sys.executable, str(script), "--max-floors", "7"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "no loop between folders" in out.stdout
