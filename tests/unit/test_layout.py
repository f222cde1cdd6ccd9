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
