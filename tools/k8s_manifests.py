"""Kubernetes manifests as `rayrlhf.tools.k8s_validate` reads them: YAML documents, and kustomizations rendered in pure
Python for the subset of kustomize the manifests under k8s/ use (`resources`, `images`, `namespace`, JSON6902
`patches` with a `target`); anything else is a `RenderError`, never skipped. Needs only PyYAML.
"""

from __future__ import annotations

import copy
import json
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
# The CRDs are 1-1.4 MB of YAML each: the C loader reads them 10x faster than the pure-Python one.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Manifest:
    """One YAML document. `source` is `file#index`; `rendered_by` the kustomization directory, if any."""

    source: str
    doc: Any  # a mapping, unless the YAML is not a manifest at all
    rendered_by: str | None = None

    @property
    def where(self) -> str:
        return f"{self.rendered_by}: {self.source}" if self.rendered_by else self.source

    @property
    def label(self) -> str:
        doc = mapping(self.doc)
        return f"{doc.get('kind', '?')}/{mapping(doc.get('metadata')).get('name', '?')}"


@dataclass(frozen=True)
class Problem:
    where: str  # file#document, prefixed by the kustomization that rendered it
    label: str  # kind/name
    path: str  # JSON path in the document; `... > key` continues into an embedded YAML string
    message: str

    @classmethod
    def of(cls, m: Manifest, path: str, message: str) -> Problem:
        return cls(m.where, m.label, path, message)

    def __str__(self) -> str:
        return f"{self.where} {self.label} {self.path}: {self.message}"


class RenderError(Exception):
    """A kustomization that cannot be rendered (or uses a feature the offline renderer does not support)."""


def mapping(value: Any) -> dict:
    """`value` if it is a mapping, else {}: the rules below must not crash on the malformed input they report."""
    return value if isinstance(value, dict) else {}


def ray_resources(value: str) -> dict:
    """The custom resources of a `rayStartParams.resources` value, the quoted JSON object KubeRay passes to
    `ray start --resources` through a shell ('"{\\"role_x\\": 1}"'); ValueError saying what is wrong."""
    if not (len(value) >= 2 and value[0] == value[-1] == '"'):
        raise ValueError('must be a double-quoted JSON object, e.g. \'"{\\"role_x\\": 1}"\'')
    try:
        parsed = json.loads(value[1:-1].replace('\\"', '"'))
    except json.JSONDecodeError as e:
        raise ValueError(f"not a JSON object once unquoted: {e}") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, (int, float)) for v in parsed.values()):
        raise ValueError("must map resource names to numbers")
    return parsed


def json_path(parts: typing.Iterable[str | int], root: str = "$") -> str:
    """["spec", "workerGroupSpecs", 0, "nvidia.com/gpu"] -> $.spec.workerGroupSpecs[0]['nvidia.com/gpu']"""
    out = root
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if re.fullmatch(r"[A-Za-z_][\w-]*", p) else f"['{p}']"
    return out


def inner(where: str, parts: typing.Iterable[str | int]) -> str:
    """A path inside a YAML string embedded at `where`: $.spec.serveConfigV2 > applications[0].name"""
    return f"{where} > {json_path(parts, '').lstrip('.')}"


def find_key(node: Any, key: str, path: list) -> Iterator[tuple[list, Any]]:
    """(path, value) of every mapping entry named `key`, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield path + [k], v
            yield from find_key(v, key, path + [k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from find_key(v, key, path + [i])


def containers(doc: dict) -> Iterator[tuple[list, dict]]:
    """Every container of every pod template in `doc`, wherever the kind nests it."""
    for key in ("containers", "initContainers"):
        for path, items in find_key(doc, key, []):
            if isinstance(items, list):
                yield from ((path + [i], c) for i, c in enumerate(items) if isinstance(c, dict))


# ---------------------------------------------------------------------------------------------- loading


def load_documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of one file; raises RenderError for YAML that does not parse."""
    try:
        docs = list(yaml.load_all(path.read_text(), Loader=Loader))
    except (OSError, yaml.YAMLError) as e:
        raise RenderError(f"cannot read {path}: {e}") from e
    return [Manifest(f"{path}#{i}", d) for i, d in enumerate(docs) if d is not None]


def _read_kustomization(directory: Path) -> dict:
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text()) or {}
    if not isinstance(spec, dict):
        raise RenderError(f"{directory / KUSTOMIZATION}: not a mapping")
    unsupported = sorted(set(spec) - {"apiVersion", "kind", "resources", "images", "namespace", "patches"})
    if unsupported:
        raise RenderError(
            f"{directory / KUSTOMIZATION}: fields {unsupported} are not supported by the offline renderer"
        )
    return spec


def render(directory: Path) -> list[Manifest]:
    """`kustomize build directory` for the subset described in the module docstring."""
    spec = _read_kustomization(directory)
    loaded: list[Manifest] = []
    for entry in spec.get("resources", []):
        path = Path(os.path.normpath(directory / entry))  # overlays/x/../../base/f.yaml -> base/f.yaml
        loaded += render(path) if path.is_dir() else load_documents(path)
    docs = [copy.deepcopy(m.doc) for m in loaded]
    for patch in spec.get("patches", []):
        _apply_patch(directory, patch, docs)
    for image in spec.get("images", []):
        for doc in docs:
            for _, container in containers(doc):
                if isinstance(container.get("image"), str):
                    container["image"] = _retag(container["image"], image)
    if "namespace" in spec:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return [Manifest(m.source, doc, str(directory)) for m, doc in zip(loaded, docs, strict=True)]


def _retag(ref: str, image: dict) -> str:
    """kustomize's `images` transformer on one reference `name[:tag][@digest]`."""
    name, _, digest = ref.partition("@")
    tag = ""
    if name.rfind(":") > name.rfind("/"):  # a colon after the last slash is a tag, not a registry port
        name, tag = name.rsplit(":", 1)
    if name != image.get("name"):
        return ref
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _apply_patch(directory: Path, entry: dict, docs: list[dict]) -> None:
    where = f"{directory / KUSTOMIZATION} patch {entry.get('path', '(inline)')}"
    target = entry.get("target")
    if set(entry) - {"path", "patch", "target"} or not isinstance(target, dict):
        raise RenderError(f"{where}: only `path` or `patch` with a `target` is supported")
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise RenderError(f"{where}: target selectors other than group/version/kind/name/namespace are not supported")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry.get("patch", "")
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        message = "strategic-merge patches are not supported offline; write a JSON6902 patch (a list of operations)"
        raise RenderError(f"{where}: {message}")
    if not all(isinstance(op, dict) for op in ops):
        raise RenderError(f"{where}: every JSON6902 operation must be a mapping")
    matched = [doc for doc in docs if _matches(doc, target)]
    if not matched:
        raise RenderError(f"{where}: target {target} matches no resource")
    for doc in matched:
        for op in ops:
            try:
                _apply_op(doc, op)
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise RenderError(f"{where}: {op.get('op')} {op.get('path')}: {e}") from e


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    meta = mapping(doc.get("metadata"))
    actual = {
        "group": group,
        "version": version,
        "kind": doc.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace", ""),
    }
    # kustomize reads target fields as anchored regular expressions.
    return all(re.fullmatch(str(want), str(actual[key] or "")) for key, want in target.items())


def _apply_op(doc: dict, op: dict) -> None:
    """One RFC 6902 operation: add, remove, replace or test (move and copy are not needed here)."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    if not keys:
        raise ValueError("the whole document cannot be patched")
    parent = doc
    for k in keys[:-1]:
        parent = parent[int(k)] if isinstance(parent, list) else parent[k]
    last: str | int = keys[-1]
    if isinstance(parent, list):
        last = len(parent) if last == "-" and op["op"] == "add" else int(last)
        if op["op"] != "add" and not 0 <= last < len(parent):
            raise IndexError(f"index {last} out of range")
    elif op["op"] != "add" and last not in parent:
        raise KeyError(last)
    if op["op"] == "add" and isinstance(parent, list):
        parent.insert(last, op["value"])
    elif op["op"] in ("add", "replace"):
        parent[last] = op["value"]
    elif op["op"] == "remove":
        del parent[last]
    elif op["op"] == "test":
        if parent[last] != op["value"]:
            raise ValueError(f"test failed: found {parent[last]!r}, expected {op['value']!r}")
    else:
        raise ValueError(f"unsupported operation {op['op']!r}")


def collect(paths: list[Path]) -> tuple[list[Manifest], list[Problem]]:
    """All documents to check: plain manifests, then every kustomization rendered."""
    files = sorted({f for p in paths for f in ([p] if p.is_file() else [*p.rglob("*.yaml"), *p.rglob("*.yml")])})
    kustomizations = [f.parent for f in files if f.name == KUSTOMIZATION]
    manifests: list[Manifest] = []
    problems: list[Problem] = []
    patch_files = set()
    for directory in kustomizations:
        try:
            patches = _read_kustomization(directory).get("patches", [])
        except (RenderError, OSError, yaml.YAMLError):
            continue  # reported when it is rendered below
        patch_files |= {(directory / p["path"]).resolve() for p in patches if isinstance(p, dict) and "path" in p}
    for f in files:
        if f.name != KUSTOMIZATION and f.resolve() not in patch_files:
            try:
                manifests += load_documents(f)
            except RenderError as e:
                problems.append(Problem(str(f), "?", "$", str(e)))
    seen = {canonical(m.doc) for m in manifests}
    for directory in kustomizations:
        try:
            rendered = render(directory)
        except (RenderError, OSError, yaml.YAMLError) as e:
            problems.append(Problem(str(directory / KUSTOMIZATION), "Kustomization", "$", f"cannot render: {e}"))
            continue
        for m in rendered:
            if canonical(m.doc) not in seen:
                seen.add(canonical(m.doc))
                manifests.append(m)
    return manifests, problems


def canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, default=str)
