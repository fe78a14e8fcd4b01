"""The package's layers hold: no import from a lower layer to a higher one (deferred imports
included), and the method, models and data import without Flower."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedbip_flower"
# Each layer may import only itself and the layers before it (lower rank). At the bottom, pure
# helpers with no package imports: the bundled benchmark's generator, the picture and JSON helpers;
# then the config (it checks data.domains against the generator's styles), then the layers.
BOTTOM = {
    "fedbip_flower.data.shapes",
    "fedbip_flower.pictures",
    "fedbip_flower.jsonio",
    "fedbip_flower",
    "fedbip_flower.__init__",
}
RANK = {"config": 1, "data": 2, "models": 3, "method": 4, "federation": 5, "tools": 6, "research": 6}


def _rank(module: str) -> int:
    """``fedbip_flower.method.concepts`` -> 4 (its layer's rank); the bottom modules 0."""
    if module in BOTTOM:
        return 0
    return RANK.get(module.split(".")[1], 99)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``fedbip_flower`` module ``path`` imports, at any depth (functions included)."""
    mod = "fedbip_flower." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("fedbip_flower")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = mod.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("fedbip_flower"):
                if name == "fedbip_flower":  # `from fedbip_flower import data` names the submodule
                    for a in node.names:
                        sub = PACKAGE / a.name
                        is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                        out.append((node.lineno, f"fedbip_flower.{a.name}" if is_module else name))
                else:
                    out.append((node.lineno, name))
    return out


def test_no_module_imports_a_higher_layer():
    wrong = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        mod = "fedbip_flower." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        mine = _rank(mod)
        for line, name in _imports(path):
            if _rank(name) > mine:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} (rank {mine}) imports {name}")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_operator_tools_and_research_code_are_apart():
    """Operators run tools/ without research/ (benchmarks, pretraining, reports), and back."""
    crossing = []
    for top, other in (("tools", "research"), ("research", "tools")):
        for path in sorted((PACKAGE / top).rglob("*.py")):
            crossing += [
                f"{path.relative_to(PACKAGE.parent)}:{ln} imports {name}"
                for ln, name in _imports(path)
                if name.startswith(f"fedbip_flower.{other}")
            ]
    assert not crossing, "\n".join(crossing)


def test_the_checker_sees_deferred_imports(tmp_path):
    """The walk finds an import inside a function body, so a hidden cycle cannot pass."""
    sample = PACKAGE / "method" / "_probe_for_layers_test.py"
    sample.write_text("def f():\n    from fedbip_flower.federation.payload import UPLOAD\n    return UPLOAD\n")
    try:
        assert (2, "fedbip_flower.federation.payload") in _imports(sample)
        assert _rank("fedbip_flower.federation.payload") > _rank("fedbip_flower.method._probe_for_layers_test")
    finally:
        sample.unlink()


def test_method_models_and_data_import_without_flower():
    modules = [
        "fedbip_flower." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for layer in ("data", "models", "method")
        for p in sorted((PACKAGE / layer).glob("*.py"))
    ] + ["fedbip_flower.config", "fedbip_flower.pictures"]
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flwr' or name.startswith('flwr.'):\n"
        "            raise ImportError('flwr is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "assert not any(k == 'flwr' or k.startswith('flwr.') for k in sys.modules)\n"
        "print(len({modules!r}))\n".replace("{modules!r}", repr(modules))
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip()) == len(modules) >= 12
