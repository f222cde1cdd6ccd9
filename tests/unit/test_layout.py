"""The layers stay visible: the core imports no ComfyUI, and the pack registers one way only."""
import ast
import subprocess
import sys

from support import REPO


def test_core_imports_without_comfyui():
    code = ("import sys; sys.path.insert(0, %r); from support import register_pack; register_pack();"
            "import fmboost.models, fmboost.flow;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes')];"
            "print(bad); sys.exit(1 if bad else 0)") % str(REPO / "tests")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_core_sources_never_import_comfy():
    for folder in ("models", "flow"):
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(n.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "latent_preview")
                                   for n in names), f"{path.name} imports {names}"


def test_one_registration_path():
    tree = ast.parse((REPO / "__init__.py").read_text())
    names = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    funcs = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert "comfy_entrypoint" in funcs
    assert "NODE_CLASS_MAPPINGS" not in names  # it would make ComfyUI ignore comfy_entrypoint


def test_comfy_registry_validation_passes():
    """`comfy node validate` (comfy-cli, the Comfy Registry's own check) on this checkout, plus the fields the
    registry page shows: repository URL, display name and icon."""
    import shutil
    import tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["urls"]["Repository"].startswith("https://")
    assert meta["tool"]["comfy"]["DisplayName"] and meta["tool"]["comfy"]["Icon"].startswith("https://")
    icon = meta["tool"]["comfy"]["Icon"].rsplit("/main/", 1)[1]
    assert (REPO / icon).is_file()  # the icon URL names a file of this repository
    comfy = REPO / ".cache" / "comfy-cli" / "bin" / "comfy"
    assert comfy.exists() or shutil.which("comfy"), "comfy-cli missing: run scripts/provision.sh"
    proc = subprocess.run([str(comfy if comfy.exists() else shutil.which("comfy")), "--skip-prompt",
                           "--no-enable-telemetry", "node", "validate"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "passed" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
