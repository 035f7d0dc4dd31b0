"""The KubeRay manifests under k8s/ validate offline, and each deliberately broken manifest fails for its reason.

Each file in tests/data/k8s_broken/ states the problems it must produce in `# expect: <text>` lines: the
validator must report exactly that many problems, each containing one expected text. Nothing here starts Ray.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayrlhf.tools import k8s_manifests as km
from rayrlhf.tools import k8s_validate as kv

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "k8s-crds"
K8S = REPO / "k8s"
BROKEN = sorted((Path(__file__).parent / "data" / "k8s_broken").glob("*.yaml"))


@pytest.fixture
def crds() -> Path:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    return CRDS


def test_k8s_manifests_are_valid(crds: Path) -> None:
    manifests, problems = kv.collect([K8S])
    problems += kv.validate(manifests, crds)
    assert problems == [], "\n".join(map(str, problems))
    labels = {(m.rendered_by and Path(m.rendered_by).name, m.label) for m in manifests}
    for overlay in (None, "small", "large", "gcs-ft"):
        for label in ("RayJob/rayrlhf-pipeline", "RayService/rayrlhf-reward", "RayCluster/rayrlhf-dev"):
            assert (overlay, label) in labels


def _values_of(tree, key: str):
    """Every value under `key` in a nested mapping, and every env entry's value named `key`."""
    if isinstance(tree, dict):
        if tree.get("name") == key and "value" in tree:
            yield tree["value"]
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _values_of(v, key)


def test_the_import_paths_the_pods_load_are_rayrlhfs() -> None:
    """The Serve proxy callback and the RayService application are imported by Ray in the pods: a path of the old
    layout (`serving.proxy:...`, before everything moved under `rayrlhf.`) would fail only there."""
    import importlib

    import yaml

    from rayrlhf.serving.proxy import PROXY_CALLBACK

    manifests, _ = kv.collect([K8S])
    callbacks = [v for m in manifests for v in _values_of(m.doc, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")]
    assert callbacks and set(callbacks) == {PROXY_CALLBACK}
    apps = [app["import_path"] for m in manifests if isinstance(m.doc, dict) and m.doc.get("kind") == "RayService"
            for app in yaml.safe_load(m.doc["spec"]["serveConfigV2"])["applications"]]
    assert apps
    for path in {*apps, PROXY_CALLBACK}:
        module, attr = path.split(":")
        assert module.startswith("rayrlhf.") and importlib.util.find_spec(module) is not None, path
    assert all(hasattr(importlib.import_module(a.split(":")[0]), a.split(":")[1]) for a in {PROXY_CALLBACK})


def test_validation_does_not_start_ray(crds: Path) -> None:
    # In a fresh interpreter: other tests of the session share an initialised Ray.
    code = ("import sys, ray; from pathlib import Path; import rayrlhf.tools.k8s_validate as kv; "
            "kv.validate(kv.collect([Path(sys.argv[1])])[0], Path(sys.argv[2])); assert not ray.is_initialized()")
    subprocess.run([sys.executable, "-c", code, str(K8S / "base"), str(crds)], check=True)


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_manifest_fails_for_its_reason(path: Path, crds: Path) -> None:
    expected = [line.split("# expect:", 1)[1].strip() for line in path.read_text().splitlines() if "# expect:" in line]
    assert expected, f"{path.name} has no `# expect:` line"
    manifests, problems = kv.collect([path])
    problems += kv.validate(manifests, crds)
    found = [str(p) for p in problems]
    assert len(found) == len(expected), "\n".join(found)
    for text in expected:
        assert any(text in line for line in found), f"{text!r} not in:\n" + "\n".join(found)


def test_overlays_change_image_and_sizes() -> None:
    small = {m.label: m.doc for m in km.render(K8S / "overlays" / "small")}
    large = {m.label: m.doc for m in km.render(K8S / "overlays" / "large")}
    for docs in (small, large):
        images = {c["image"] for doc in docs.values() for _, c in km.containers(doc)}
        assert images == {"registry.example.com/rayrlhf:0.1.0"}
    assert "configs/opt-350m.yaml" in small["RayJob/rayrlhf-pipeline"]["spec"]["entrypoint"]
    rollout = large["RayJob/rayrlhf-pipeline"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]
    assert (rollout["groupName"], rollout["replicas"]) == ("rollout", 2)
    gpu_pod = large["RayCluster/rayrlhf-dev"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu_pod["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_large_overlay_runs_the_learner_as_a_group_that_fits_its_pod() -> None:
    """The learner pod holds the learner group: ppo.learner_workers x (ppo.num_cpus, ppo.num_gpus), requests =
    limits, and the entrypoint's config (with its --set items) validates."""
    import shlex

    from rayrlhf.core.config import load_config

    job = {m.label: m.doc for m in km.render(K8S / "overlays" / "large")}["RayJob/rayrlhf-pipeline"]
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = load_config(REPO / argv[argv.index("--config") + 1],
                      [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    learner = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert learner["groupName"] == "learner"
    res = learner["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"]
    n = cfg.ppo.learner_workers
    assert n == 4 and int(res["limits"]["nvidia.com/gpu"]) == n * cfg.ppo.num_gpus
    assert int(res["limits"]["cpu"]) >= n * cfg.ppo.num_cpus


def test_every_overlay_pins_each_role_to_its_group_and_bounds_the_run() -> None:
    """The failure policy (k8s_policy) in every rendering: roles asking for their worker group's resource, a
    deadline, no KubeRay retries of a run that would start over, a learner restart budget; gcs-ft adds the GCS's
    external Redis to all three clusters."""
    import shlex

    from rayrlhf.tools import k8s_policy

    for overlay in (K8S / "base", *(K8S / "overlays" / o for o in ("small", "large", "gcs-ft"))):
        docs = {m.label: m for m in km.render(overlay)}
        job = docs["RayJob/rayrlhf-pipeline"]
        assert k8s_policy.job_problems(job) == []
        spec = job.doc["spec"]
        assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0
        cfg = k8s_policy._entrypoint_config(shlex.split(spec["entrypoint"]))
        assert (cfg.ppo.resources, cfg.rollout.resources) == ({"role_learner": 1}, {"role_rollout": 1})
        assert cfg.ppo.max_learner_restarts >= 1
        ft = [d.doc for d in docs.values() if "gcsFaultToleranceOptions" in str(d.doc)]
        assert len(ft) == (3 if overlay.name == "gcs-ft" else 0)
    assert "Deployment/rayrlhf-redis" in {m.label for m in km.render(K8S / "overlays" / "gcs-ft")}


def _overlay(tmp_path: Path, patch: str) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources:\n  - pvc.yaml\n")
    (tmp_path / "base" / "pvc.yaml").write_text(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\n"
        "spec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n"
    )
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(
        "resources:\n  - ../base\npatches:\n  - path: patch.yaml\n    target:\n      kind: PersistentVolumeClaim\n"
    )
    (tmp_path / "overlay" / "patch.yaml").write_text(patch)
    return tmp_path


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ("- op: test\n  path: /metadata/name\n  value: other\n", "test failed: found 'data', expected 'other'"),
        ("- op: replace\n  path: /spec/volumeName\n  value: v\n", "replace /spec/volumeName: 'volumeName'"),
        ("spec:\n  volumeName: v\n", "strategic-merge patches are not supported offline"),
    ],
)
def test_overlay_that_cannot_render_is_reported(tmp_path: Path, patch: str, reason: str) -> None:
    manifests, problems = kv.collect([_overlay(tmp_path, patch)])
    assert [m.label for m in manifests] == ["PersistentVolumeClaim/data"]  # the base, checked on its own
    assert len(problems) == 1 and reason in str(problems[0]), problems


def test_json6902_operations() -> None:
    doc = {"spec": {"list": [1, 2], "a/b": {"x": 1}}}
    for op in (
        {"op": "add", "path": "/spec/list/-", "value": 3},
        {"op": "add", "path": "/spec/list/0", "value": 0},
        {"op": "remove", "path": "/spec/a~1b/x"},
        {"op": "replace", "path": "/spec/list/1", "value": 10},
        {"op": "test", "path": "/spec/list", "value": [0, 10, 2, 3]},
    ):
        km._apply_op(doc, op)
    assert doc == {"spec": {"list": [0, 10, 2, 3], "a/b": {}}}


@pytest.mark.parametrize(
    ("ref", "image", "expected"),
    [
        ("rayrlhf:dev", {"name": "rayrlhf", "newName": "reg.io/rayrlhf", "newTag": "1"}, "reg.io/rayrlhf:1"),
        ("rayrlhf:dev", {"name": "rayrlhf", "newName": "reg.io/rayrlhf"}, "reg.io/rayrlhf:dev"),
        ("localhost:5000/rayrlhf", {"name": "localhost:5000/rayrlhf", "newTag": "2"}, "localhost:5000/rayrlhf:2"),
        ("rayrlhf:dev", {"name": "rayrlhf", "digest": "sha256:ab"}, "rayrlhf@sha256:ab"),
        ("busybox:1.36", {"name": "rayrlhf", "newTag": "1"}, "busybox:1.36"),
    ],
)
def test_images_transformer(ref: str, image: dict, expected: str) -> None:
    assert km._retag(ref, image) == expected


def test_exit_codes(crds: Path, tmp_path: Path) -> None:
    assert kv.main([str(K8S), "--crds", str(crds)]) == 0
    assert kv.main([str(BROKEN[0]), "--crds", str(crds)]) == 1
    for argv in ([str(tmp_path / "missing.yaml")], [str(K8S), "--crds", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            kv.main(argv)
        assert exit_info.value.code == 2


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", ["base", "overlays/small", "overlays/large"])
def test_renderer_matches_kubectl_kustomize(overlay: str) -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True)
    theirs = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(built.stdout) if d}
    assert {m.label: m.doc for m in km.render(K8S / overlay)} == theirs  # kustomize reorders; compare by kind/name


# A "billion laughs": 9 levels of 9 aliases, 9**9 (387 million) "lol"s once expanded, from 420 bytes.
BILLION_LAUGHS = """apiVersion: v1
kind: ConfigMap
metadata:
  name: lol
data:
  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_billion_laughs_is_refused_unexpanded_as_kubernetes_refuses_it(crds: Path, tmp_path: Path) -> None:
    """The file is refused, naming it and the reason, and so is the kustomization that reads it; the rest is
    checked. In a subprocess with a timeout: expanded, the document would take gigabytes and minutes."""
    (tmp_path / "lol.yaml").write_text(BILLION_LAUGHS)
    _overlay(tmp_path, "- op: test\n  path: /metadata/name\n  value: data\n")
    (tmp_path / "base" / "kustomization.yaml").write_text("resources:\n  - pvc.yaml\n  - ../lol.yaml\n")
    run = subprocess.run([sys.executable, "-m", "rayrlhf.tools.k8s_validate", str(tmp_path), "--crds", str(crds)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        f"{tmp_path / 'lol.yaml'} ? $: refused: document 0 contains excessive aliasing (Kubernetes' YAML decoder "
        "refuses it)",
        f"{tmp_path / 'base' / km.KUSTOMIZATION} Kustomization $: cannot render: it reads {tmp_path / 'lol.yaml'}, "
        "refused",
        f"{tmp_path / 'overlay' / km.KUSTOMIZATION} Kustomization $: cannot render: it reads {tmp_path / 'lol.yaml'}, "
        "refused",
    ]
    assert "1 documents checked" in run.stderr  # the PVC, on its own; the overlay's patch is not a manifest


@pytest.mark.parametrize(("aliases", "refused"), [(110, False), (111, True)])
def test_aliasing_is_refused_past_go_yaml_ratio(aliases: int, refused: bool) -> None:
    """[&a [x * 999], *a * k]: go-yaml decodes 1 document + 1 list + 1 list + 999 scalars as written, then per alias
    the alias node and 1000 nodes from it, so 1000k of 1002 + 1001k nodes come from aliases: over 99% from
    k = 111 on (110,000 / 111,112 = 0.98999; 111,000 / 112,113 = 0.99007)."""
    text = "[&a [" + ", ".join(["x"] * 999) + "]" + ", *a" * aliases + "]"
    assert kv.excessive_aliasing(yaml.compose(text)) is refused
    assert (kv.yaml_refusal(text) is not None) is refused


def test_ordinary_anchors_and_embedded_yaml() -> None:
    """Anchors as manifests use them pass; an embedded YAML string is refused the same way as a file."""
    env = "[" + ", ".join(f"{{name: V{i}, value: '{i}'}}" for i in range(50)) + "]"
    text = f"a: {{env: &env {env}}}\n" + "".join(f"c{i}: {{env: *env}}\n" for i in range(20))
    assert kv.yaml_refusal(text) is None
    m = km.Manifest("job.yaml#0", {"kind": "RayJob", "metadata": {"name": "job"}})
    problems = kv._runtime_env_problems(m, BILLION_LAUGHS.split("\ndata:\n", 1)[1])
    assert [p.message for p in problems] == [
        "refused: document 0 contains excessive aliasing (Kubernetes' YAML decoder refuses it)"]


def test_a_file_over_the_api_servers_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(kv.MAX_FILE_BYTES + 1)  # sparse: nothing to parse, and nothing is
    manifests, problems = kv.collect([tmp_path])
    assert manifests == [] and [str(p) for p in problems] == [
        f"{big} ? $: refused: {kv.MAX_FILE_BYTES + 1} bytes, over the {kv.MAX_FILE_BYTES} the API server accepts"]
