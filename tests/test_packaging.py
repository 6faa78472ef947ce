"""The installed layout: the library stands alone, and nothing named plain `cli` or `serving` is importable."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import outlier_jebm
from outlier_jebm import registry

LIBRARY = Path(outlier_jebm.__file__).resolve().parent


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # -I: isolated mode, so neither the repository (cwd) nor PYTHONPATH is on sys.path; only the install is
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_command_line_and_the_server_install_under_the_distributions_namespace(tmp_path):
    for plain in ("cli", "serving"):
        r = _run(f"import {plain}", tmp_path)
        assert r.returncode != 0 and f"No module named '{plain}'" in r.stderr, (plain, r.stdout, r.stderr)
    r = _run("import jebm_od.cli.main, jebm_od.serving.app, outlier_jebm.io.payload; print('ok')", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["jebm-od"] == "jebm_od.cli.main:app"


def test_the_library_never_imports_the_command_line_or_the_server():
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("cli", "serving", "jebm_od")]
    assert offenders == []


def test_the_pyfunc_models_code_is_a_file_of_the_library():
    code = Path(registry.PYFUNC_CODE).resolve()
    assert code.is_file() and LIBRARY in code.parents
    # MLflow reads it as a file, so its imports must all resolve from the library alone
    tree = ast.parse(code.read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in modules if m.startswith("outlier_jebm")} and not {
        m for m in modules if m.split(".")[0] in ("cli", "serving", "jebm_od")
    }


def test_every_folder_of_the_library_is_in_the_packages_it_installs():
    import tomllib

    repo = LIBRARY.parent
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.relative_to(repo).parts)
        for p in LIBRARY.rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py")) or p.name == "configs"
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert {"jebm_od.cli", "jebm_od.serving"} <= listed


def test_no_library_module_is_over_500_lines():
    long = {
        str(p.relative_to(LIBRARY)): n for p in LIBRARY.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}, "split these along their seams"
