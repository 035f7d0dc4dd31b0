"""The layers stay visible: the foundation and the role classes load without Ray or vLLM, imports point down."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_foundation_and_role_modules_import_neither_ray_nor_vllm():
    mods = [m for m in import_graph.modules() if import_graph.package_of(m) in ("rayrlhf.core", "rayrlhf.roles")]
    assert "rayrlhf.roles.learner" in mods and "rayrlhf.core.config" in mods and "rayrlhf.roles.vllm_backend" in mods
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('ray', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_import_cycle_and_no_upward_import():
    graph = import_graph.package_graph()
    assert import_graph.find_cycle(graph) is None
    assert import_graph.upward_imports(graph) == []
    assert "rayrlhf.core" in graph["rayrlhf.roles"] and "rayrlhf.roles" in graph["rayrlhf.actors"]  # read
    assert import_graph.bare_imports() == [] and import_graph.tool_imports() == []
    modules = import_graph.module_graph()
    assert import_graph.find_cycle(modules) is None  # checkpoints <-> metrics was one (core.files broke it)
    assert "rayrlhf.core.files" in modules["rayrlhf.core.metrics"]


def test_the_checker_finds_a_cycle_and_an_upward_import():
    core, roles, pipeline = "rayrlhf.core", "rayrlhf.roles", "rayrlhf.pipeline"
    graph = {core: {pipeline}, roles: {core}, "rayrlhf.serving": set(), "rayrlhf.actors": set(),
             pipeline: {roles}}
    assert import_graph.find_cycle(graph) == [core, pipeline, roles, core]
    assert import_graph.upward_imports(graph) == [(core, pipeline)]


def test_every_ray_remote_lives_in_actors():
    found = [p.relative_to(ROOT).as_posix() for pkg in ("core", "roles", "actors", "serving", "pipeline", "tools")
             for p in (ROOT / pkg).rglob("*.py") if "@ray.remote" in p.read_text()]
    assert found == ["actors/__init__.py"]


def test_k8s_validator_without_its_extra_exits_2_naming_it():
    code = ("import sys; sys.modules['jsonschema'] = None\n"
            "from rayrlhf.tools.k8s_validate import main; sys.exit(main(['k8s']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "install rayrlhf[k8s]" in out.stderr and "Traceback" not in out.stderr
