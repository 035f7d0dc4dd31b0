"""Offline validation of the Kubernetes manifests under k8s/: no cluster, no network, no Ray started.

    python -m rayrlhf.tools.k8s_validate k8s/ [more paths] [--crds DIR]

Every YAML document under the paths is checked; `kustomization.yaml` files are rendered, not validated:
- RayJob / RayService / RayCluster against the openAPIV3Schema of the served CRD version in --crds, enforced
  the way the API server does: unknown fields are rejected (every object without
  x-kubernetes-preserve-unknown-fields is closed), `default`s are filled in before `required` is checked,
  `nullable` and x-kubernetes-int-or-string are honoured, list-type set/map entries must be unique, and
  `metadata` is checked as an ObjectMeta.
- Core kinds (PersistentVolumeClaim, Secret, ...) against kubernetes-validate's bundled strict schemas, for
  the newest Kubernetes version it bundles.
- RayJob spec.runtimeEnvYAML with Ray's own `ray.runtime_env.RuntimeEnv`, and RayService spec.serveConfigV2
  with Ray Serve's `ServeDeploySchema`. Both accept unknown keys (forwarded to plugins, or ignored for forward
  compatibility); here they are errors, since a misspelt option would otherwise vanish silently.
- The CRDs' CEL rules (x-kubernetes-validations), evaluated with cel-python on the defaulted object, as on
  create (transition rules, which compare with `oldSelf`, apply to updates only).
- Object names: a DNS-1123 subdomain, and for KubeRay's kinds a DNS-1035 label (it names Services after them).
- The enumerations KubeRay's validation enforces where its CRDs declare a plain string: RayJob
  spec.submissionMode, RayService spec.upgradeStrategy.type, the head group's serviceType.
- Project rules: every document has metadata.name; a container's nvidia.com/gpu request equals its limit;
  rayStartParams.resources is the quoted JSON object KubeRay passes to `ray start --resources`; a RayJob that
  runs rayrlhf follows the failure and placement policy of `k8s_policy` (a deadline, retries only of a
  resuming entrypoint, a worker group with room for every role's custom resources, a learner restart budget).
Not checked: string formats (int32, date-time), and KubeRay's other run-time checks (e.g. a suspended RayJob
needs shutdownAfterJobFinishes).

Overlays are rendered in pure Python for the subset of kustomize these manifests use: `resources` (files and
directories), `images`, `namespace`, and JSON6902 `patches` (add, remove, replace, test) with a `target`.
Anything else (strategic-merge patches, generators, ...) is reported as unsupported, never skipped.
A rendered document identical to one already checked (e.g. the base rendered on its own) is not re-checked.

YAML that would exhaust whoever expands it is refused before anything expands it, file by file (with the
kustomizations that read it), as Kubernetes' decoder refuses it: a file over the 3 MiB the API server accepts,
and a document whose alias expansion is out of proportion to its size (a "billion laughs"; see
`excessive_aliasing`). The same holds for the YAML embedded in runtimeEnvYAML and serveConfigV2.

Exit status: 0 all valid, 1 problems (all listed, one per line: file#document kind/name JSON-path: message),
2 usage error (bad path, missing CRD directory).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rayrlhf.tools import k8s_manifests
from rayrlhf.tools.k8s_policy import job_problems
from rayrlhf.tools.k8s_manifests import (
    KUSTOMIZATION, Loader, Manifest, Problem, canonical, containers, find_key, inner, json_path, mapping, ray_resources,
)

# The validators come with the `k8s` extra (`pip install 'rayrlhf[k8s]'`); without it `main` says so and exits 2.
try:
    import celpy  # noqa: F401 - cel-python, for the CRDs' CEL rules
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
except ModuleNotFoundError as e:
    MISSING: str | None = e.name
else:
    MISSING = None

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRDS = REPO_ROOT.parent / "shared" / "k8s-crds"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
GPU = "nvidia.com/gpu"
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


# ---------------------------------------------------------------------------------------------- schemas


@cache
def _core_schemas() -> tuple[Any, Registry]:
    """kubernetes-validate's strict schemas for its newest Kubernetes version, and a registry for their $refs."""
    version = kubernetes_validate.latest_version()
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    definitions = Resource.from_contents(json.loads((root / "_definitions.json").read_text()))
    return root, definitions @ Registry()


def _core_validator(api_version: str, kind: str) -> jsonschema.Validator | None:
    root, registry = _core_schemas()
    # The file naming of kubernetes-validate: apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_file = root / f"{kind.lower()}-{group_version}.json"
    if not schema_file.is_file():
        return None
    return jsonschema.Draft202012Validator(json.loads(schema_file.read_text()), registry=registry)


@cache
def _crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD in crd_dir."""
    out = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if isinstance(crd, dict) and crd.get("kind") == "CustomResourceDefinition":
                spec = crd["spec"]
                for version in spec["versions"]:
                    if version.get("served"):
                        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                        out[key] = version["schema"]["openAPIV3Schema"]
    return out


def _structural(schema: dict) -> dict:
    """A copy of a CRD schema that jsonschema enforces the way the API server does (see module docstring)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _structural(s["items"])
    for keyword in ("allOf", "anyOf", "oneOf"):
        if keyword in s:
            s[keyword] = [_structural(sub) for sub in s[keyword]]
    # Structural schemas: fields not declared are pruned by the API server, so for a manifest they are mistakes.
    if (
        s.get("type") == "object"
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        s["additionalProperties"] = False
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


def _unique_list_entries(validator, list_type, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: `set` items, and `map` items' x-kubernetes-list-map-keys, must be unique."""
    if list_type not in ("set", "map") or not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for i, item in enumerate(instance):
        key = canonical({k: item.get(k) for k in keys} if list_type == "map" and isinstance(item, dict) else item)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {list_type}", path=[i])
        seen.add(key)


@cache
def _crd_validator_class() -> type:
    return jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                        {"x-kubernetes-list-type": _unique_list_entries})


@cache
def _crd_validator(crd_dir: Path, api_version: str, kind: str) -> jsonschema.Validator | None:
    schema = _crd_schemas(crd_dir).get((api_version, kind))
    if schema is None:
        return None
    schema = _structural(schema)
    # The API server validates a custom resource's metadata as ObjectMeta, whatever its CRD says.
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    return _crd_validator_class()(schema, registry=_core_schemas()[1])


def _fill_defaults(schema: dict, value: Any) -> None:
    """Set missing fields that have a schema `default`, as the API server does before validating."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _fill_defaults(sub, value[key])
        if isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                if key not in properties:
                    _fill_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _fill_defaults(schema["items"], item)


@cache
def _cel_program(rule: str):
    import celpy  # cel-python, with the k8s extra

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_problems(m: Manifest, schema: dict, value: Any, path: list) -> list[Problem]:
    """The CRD's x-kubernetes-validations (CEL) on `value` and everything below it, as the API server evaluates
    them on create: `self` is the value at the rule's node (defaults filled in); transition rules (`oldSelf`)
    apply to updates only and are skipped."""
    import celpy

    problems = []
    for v in schema.get("x-kubernetes-validations", []):
        rule = v.get("rule", "")
        if "oldSelf" in rule:
            continue
        try:
            ok = bool(_cel_program(rule).evaluate({"self": celpy.json_to_cel(value)}))
        except Exception as e:  # noqa: BLE001 - an unevaluable rule is reported, never passed
            problems.append(Problem.of(m, json_path(path), f"CEL rule {rule!r} could not be evaluated: {e}"))
            continue
        if not ok:
            problems.append(Problem.of(m, json_path(path), v.get("message") or f"fails the CEL rule {rule!r}"))
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                problems += _cel_problems(m, sub, item, path + [key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += _cel_problems(m, schema["items"], item, path + [i])
    return problems


def _schema_problems(m: Manifest, validator: jsonschema.Validator, instance: dict) -> list[Problem]:
    problems = []
    for e in validator.iter_errors(instance):
        path = list(e.absolute_path)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            declared = e.schema.get("properties", {})
            problems += [Problem.of(m, json_path(path + [k]), "unknown field") for k in e.instance if k not in declared]
        else:
            message = e.message if len(e.message) <= 300 else e.message[:300] + "..."
            problems.append(Problem.of(m, json_path(path), message))
    return problems


# ---------------------------------------------------------------------------------------------- YAML bombs

# The API server refuses a request body over 3 MiB (k8s.io/apiserver ServerRunOptions.MaxRequestBodyBytes).
MAX_FILE_BYTES = 3 * 1024 * 1024


def _allowed_alias_ratio(decoded: int) -> float:
    """go-yaml's allowedAliasRatio (gopkg.in/yaml.v2 decode.go): the share of decoded nodes that may come from
    alias expansion: 99% up to 400,000 nodes, 10% from 4,000,000, linear in between."""
    if decoded <= 400_000:
        return 0.99
    if decoded >= 4_000_000:
        return 0.10
    return 0.99 - 0.89 * (decoded - 400_000) / 3_600_000


def excessive_aliasing(root: yaml.Node) -> bool:
    """Whether go-yaml, which decodes every manifest for kubectl and the API server (through sigs.k8s.io/yaml),
    refuses this document with "document contains excessive aliasing".

    go-yaml counts the nodes it decodes, expanding each alias (the alias node and a copy of its target), and fails
    once more than 100 of more than 1000 came from aliases and their share exceeds `_allowed_alias_ratio`. The
    same count here walks the composed graph, where an alias is a second reference to a node, and builds nothing.
    It stops at the refusal, so it visits at most about 100 nodes per node written (10 for millions of nodes):
    a 1.7 kB "billion laughs" is refused after about 10,000 steps instead of expanding to gigabytes.
    """
    seen: set[int] = set()
    alias_edges: set[tuple[int, int]] = set()  # (id of the parent, index of the child) written as an alias
    decoded, aliased = 1, 0  # go-yaml counts the document node too
    stack: list[tuple[yaml.Node, int, tuple[int, int] | None]] = [(root, 0, None)]  # node, alias depth, edge
    while stack:
        node, depth, edge = stack.pop()
        if depth == 0:  # the walk through the document as written, in its order: a node met again is an alias
            if id(node) in seen:
                alias_edges.add(edge)
            seen.add(id(node))
        if edge in alias_edges:
            decoded, aliased, depth = decoded + 1, aliased + (depth > 0), depth + 1  # the alias node itself
        decoded, aliased = decoded + 1, aliased + (depth > 0)
        if aliased > 100 and decoded > 1000 and aliased / decoded > _allowed_alias_ratio(decoded):
            return True
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            continue
        stack += [(child, depth, (id(node), i)) for i, child in reversed(list(enumerate(children)))]
    return False


def yaml_refusal(text: str) -> str | None:
    """Why the YAML `text` is refused unexpanded (None: it is not, or it does not parse, which is reported where
    it is loaded)."""
    size = len(text.encode())
    if size > MAX_FILE_BYTES:
        return f"{size} bytes, over the {MAX_FILE_BYTES} the API server accepts"
    try:
        for i, root in enumerate(yaml.compose_all(text, Loader=Loader)):  # nodes only: aliases stay shared
            if root is not None and excessive_aliasing(root):
                return f"document {i} contains excessive aliasing (Kubernetes' YAML decoder refuses it)"
    except yaml.YAMLError:
        return None
    return None


def _file_refusal(path: Path) -> str | None:
    try:
        if (size := path.stat().st_size) > MAX_FILE_BYTES:  # refused unread
            return f"{size} bytes, over the {MAX_FILE_BYTES} the API server accepts"
        return yaml_refusal(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None  # reported where it is loaded


def _kustomization(directory: Path) -> dict:
    """directory/kustomization.yaml, unless refused or unreadable ({}: reported when it is rendered)."""
    path = directory / KUSTOMIZATION
    if _file_refusal(path) is not None:
        return {}
    try:
        return mapping(yaml.safe_load(path.read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}


def _patch_files(directory: Path) -> set[Path]:
    patches = _kustomization(directory).get("patches") or []
    return {directory / p["path"] for p in patches if isinstance(p, dict) and isinstance(p.get("path"), str)}


def _read_by_kustomization(directory: Path, visited: frozenset[Path] = frozenset()) -> set[Path]:
    """The files `k8s_manifests.render(directory)` reads: its kustomization, resources (recursively), patches."""
    files = {directory / KUSTOMIZATION} | _patch_files(directory)
    if directory in visited:
        return files
    for entry in _kustomization(directory).get("resources") or []:
        if isinstance(entry, str):
            path = Path(os.path.normpath(directory / entry))  # as `render` resolves it
            files |= _read_by_kustomization(path, visited | {directory}) if path.is_dir() else {path}
    return files


def collect(paths: list[Path]) -> tuple[list[Manifest], list[Problem]]:
    """`k8s_manifests.collect`, less the files `yaml_refusal` refuses, which are reported and never loaded (its
    `canonical` would expand their aliases), and less the kustomizations that read them."""
    files = sorted({f for p in paths for f in ([p] if p.is_file() else [*p.rglob("*.yaml"), *p.rglob("*.yml")])})
    reads = {f.parent: _read_by_kustomization(f.parent) for f in files if f.name == KUSTOMIZATION}
    refusals = {f: why for f in sorted({*files, *(f for r in reads.values() for f in r)})
                if (why := _file_refusal(f)) is not None}
    if not refusals:
        return k8s_manifests.collect(paths)
    problems = [Problem(str(f), "?", "$", f"refused: {why}") for f, why in refusals.items()]
    skipped = set(refusals)
    for directory, read in reads.items():
        if refused := sorted(read & refusals.keys()):
            problems.append(Problem(str(directory / KUSTOMIZATION), "Kustomization", "$",
                                    f"cannot render: it reads {', '.join(map(str, refused))}, refused"))
            # Its patches are not manifests: not checked on their own either.
            skipped |= {directory / KUSTOMIZATION, *_patch_files(directory)}
    manifests, more = k8s_manifests.collect([f for f in files if f not in skipped])
    return manifests, problems + more


# ---------------------------------------------------------------------------------------------- Ray


def _embedded_yaml(m: Manifest, where: str, text: str) -> tuple[dict | None, list[Problem]]:
    if (why := yaml_refusal(text)) is not None:
        return None, [Problem.of(m, where, f"refused: {why}")]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return None, [Problem.of(m, where, "not valid YAML: " + " ".join(str(e).split()))]
    if not isinstance(value, dict):
        return None, [Problem.of(m, where, f"must be a YAML mapping, got {type(value).__name__}")]
    return value, []


def _runtime_env_problems(m: Manifest, text: str) -> list[Problem]:
    """spec.runtimeEnvYAML through Ray's RuntimeEnv, as `ray job submit --runtime-env-json` does."""
    from ray.runtime_env import RuntimeEnv  # imported here: `import ray` costs about half a second

    where = "$.spec.runtimeEnvYAML"
    env, problems = _embedded_yaml(m, where, text)
    if env is None:
        return problems
    known = RuntimeEnv.known_fields | set(inspect.signature(RuntimeEnv).parameters) - {"_validate", "kwargs"}
    problems += [
        Problem.of(m, inner(where, [key]), "unknown runtime_env field (Ray would hand it to a plugin; none is used)")
        for key in env
        if key not in known
    ]
    try:
        RuntimeEnv(**env)
    except Exception as e:  # noqa: BLE001 - whatever Ray's validation raises, the runtime env is unusable
        problems.append(Problem.of(m, where, f"rejected by ray.runtime_env.RuntimeEnv: {type(e).__name__}: {e}"))
    return problems


def _serve_config_problems(m: Manifest, text: str) -> list[Problem]:
    """spec.serveConfigV2 through Ray Serve's ServeDeploySchema, plus the unknown keys it would ignore."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    where = "$.spec.serveConfigV2"
    config, problems = _embedded_yaml(m, where, text)
    if config is None:
        return problems
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        problems += [
            Problem.of(m, inner(where, err["loc"]), err["msg"].removeprefix("Value error, ")) for err in e.errors()
        ]
    problems += [
        Problem.of(m, inner(where, path), "unknown key (Ray Serve ignores it)")
        for path in _undeclared_keys(ServeDeploySchema, config, [])
    ]
    return problems


def _undeclared_keys(model: type, data: dict, path: list) -> Iterator[list]:
    fields = {alias: f for name, f in model.model_fields.items() for alias in (name, f.alias) if alias}
    for key, value in data.items():
        if key not in fields:
            yield path + [key]
            continue
        sub = _model_in(fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            yield from _undeclared_keys(sub, value, path + [key])
        elif sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _undeclared_keys(sub, item, path + [key, i])


def _model_in(annotation: Any) -> type | None:
    """The pydantic model inside an annotation such as Optional[List[Model]], if any."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _model_in(arg)) is not None), None)


# ---------------------------------------------------------------------------------------------- rules


# Object names (k8s.io/apimachinery validation): most kinds take a DNS-1123 subdomain; KubeRay names the
# Services and Pods of its clusters after them, so its kinds need a DNS-1035 label.
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Values KubeRay's own validation accepts where its CRDs declare only a string (ray-operator validation.go,
# and the Kubernetes Service types for the head service it creates).
HEAD_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
KUBERAY_ENUMS: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "RayJob": [(("spec", "submissionMode"), ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")),
               (("spec", "rayClusterSpec", "headGroupSpec", "serviceType"), HEAD_SERVICE_TYPES)],
    "RayService": [(("spec", "upgradeStrategy", "type"), ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")),
                   (("spec", "rayClusterConfig", "headGroupSpec", "serviceType"), HEAD_SERVICE_TYPES)],
    "RayCluster": [(("spec", "headGroupSpec", "serviceType"), HEAD_SERVICE_TYPES)],
}


def _name_problems(m: Manifest) -> list[Problem]:
    name, kind = mapping(m.doc.get("metadata")).get("name"), m.doc.get("kind")
    if not name:
        return [Problem.of(m, "$.metadata.name", "required")]
    if not isinstance(name, str):
        return []  # the schema reports the type
    if kind in KUBERAY_KINDS:
        if len(name) > 63 or not DNS1035_LABEL.fullmatch(name):
            return [Problem.of(m, "$.metadata.name", f"{name!r} is not a DNS-1035 label (at most 63 lower-case "
                                                     "letters, digits and '-', starting with a letter)")]
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
        return [Problem.of(m, "$.metadata.name", f"{name!r} is not a DNS-1123 subdomain (lower-case letters, "
                                                 "digits, '-' and '.', starting and ending alphanumeric)")]
    return []


def _enum_problems(m: Manifest) -> list[Problem]:
    problems = []
    for path, allowed in KUBERAY_ENUMS.get(m.doc.get("kind"), []):
        value: Any = m.doc
        for key in path:
            value = mapping(value).get(key)
        if value is not None and value not in allowed:
            problems.append(Problem.of(m, json_path(list(path)), f"{value!r} is not one of {', '.join(allowed)} "
                                                                 "(KubeRay rejects it)"))
    return problems


def _project_problems(m: Manifest) -> list[Problem]:
    problems = _name_problems(m) + _enum_problems(m)
    for path, container in containers(m.doc):
        requirements = mapping(container.get("resources"))
        requested, limit = (mapping(requirements.get(k)).get(GPU) for k in ("requests", "limits"))
        if (requested is not None or limit is not None) and str(requested) != str(limit):
            message = f"{GPU} requests ({requested}) must equal limits ({limit})"
            problems.append(Problem.of(m, json_path(path + ["resources"]), message))
    for path, params in find_key(m.doc, "rayStartParams", []):
        if isinstance(params, dict) and isinstance(params.get("resources"), str):
            problems += _ray_resources_problems(m, json_path(path + ["resources"]), params["resources"])
    return problems


def _ray_resources_problems(m: Manifest, where: str, value: str) -> list[Problem]:
    """KubeRay passes the value to `ray start --resources=<value>` through a shell (`ray_resources`)."""
    try:
        ray_resources(value)
    except ValueError as e:
        return [Problem.of(m, where, str(e))]
    return []


def validate(manifests: list[Manifest], crd_dir: Path) -> list[Problem]:
    """All problems of all manifests (an empty list: all valid)."""
    problems = []
    for m in manifests:
        if not isinstance(m.doc, dict):
            problems.append(Problem.of(m, "$", f"a manifest must be a mapping, got {type(m.doc).__name__}"))
            continue
        problems += _validate_one(m, crd_dir)
    return problems


def _validate_one(m: Manifest, crd_dir: Path) -> list[Problem]:
    api_version, kind = m.doc.get("apiVersion"), m.doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [Problem.of(m, "$", "apiVersion and kind are required")]
    if kind in KUBERAY_KINDS:
        validator = _crd_validator(crd_dir, api_version, kind)
        instance = copy.deepcopy(m.doc)
        if validator is not None:
            _fill_defaults(validator.schema, instance)
    else:
        validator, instance = _core_validator(api_version, kind), m.doc
    if validator is None:
        message = f"no schema for {kind} {api_version} (CRDs from {crd_dir}, core kinds from kubernetes-validate)"
        return [Problem.of(m, "$", message)]
    problems = _schema_problems(m, validator, instance) + _project_problems(m)
    if kind in KUBERAY_KINDS:
        problems += _cel_problems(m, validator.schema, instance, [])
    spec = mapping(m.doc.get("spec"))
    if kind == "RayJob":
        problems += job_problems(m)
    if kind == "RayJob" and isinstance(spec.get("runtimeEnvYAML"), str):
        problems += _runtime_env_problems(m, spec["runtimeEnvYAML"])
    if kind == "RayService" and isinstance(spec.get("serveConfigV2"), str):
        problems += _serve_config_problems(m, spec["serveConfigV2"])
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayrlhf.tools.k8s_validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="YAML files or directories (searched recursively)")
    parser.add_argument(
        "--crds", type=Path, default=DEFAULT_CRDS, help=f"KubeRay CRD directory (default: {DEFAULT_CRDS})"
    )
    args = parser.parse_args(argv)
    if MISSING is not None:
        print(f"{parser.prog}: error: needs the {MISSING} package: install rayrlhf[k8s] "
              "(pip install 'rayrlhf[k8s]')", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    if not args.crds.is_dir() or not _crd_schemas(args.crds.resolve()):
        parser.error(f"no KubeRay CRDs in {args.crds} (--crds)")
    manifests, problems = collect(args.paths)
    problems += validate(manifests, args.crds.resolve())
    for problem in problems:
        print(problem)
    print(f"{len(manifests)} documents checked, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
