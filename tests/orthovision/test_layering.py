"""The layering of docs/DESIGN.md: the library (orthovision/) never imports the serving
package, Ray or the benchmarks, so it installs, imports and tests without them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from orthovision.paths import PROJECT_ROOT

FORBIDDEN = ("ray", "serve", "bench")


def test_no_library_module_names_ray_serve_or_bench_in_an_import():
    offenders = []
    for path in sorted((PROJECT_ROOT / "orthovision").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {name}")
    assert offenders == []


PROBE = """
import importlib, json, pkgutil, sys
import orthovision
names = [m.name for m in pkgutil.walk_packages(orthovision.__path__, "orthovision.")]
for name in names:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None})
print(json.dumps({"modules": len(names), "loaded": loaded}))
"""


def test_the_whole_library_imports_with_ray_absent():
    """Every orthovision module imported in a fresh interpreter where `ray` cannot be
    imported at all (a None entry in sys.modules makes `import ray` raise)."""
    code = "import sys; sys.modules['ray'] = None\n" + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] >= 40
    assert not set(report["loaded"]) & set(FORBIDDEN)
