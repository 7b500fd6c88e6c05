"""Docs and examples say only what is true: the API reference is what the .proto says, every
ACROSCREEN_* variable they mention is one the server reads, every repository path they name
exists, and the examples compile against the client package alone."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from acroscreen.server.config import env_names

REPO = Path(__file__).resolve().parents[2]
ENV_NAME = re.compile(r"\bACROSCREEN_[A-Z0-9_]*[A-Z0-9]\b")
# Text a deployer reads: every file under these, and the README.
DOC_ROOTS = ("deploy", "docs", "examples")
TEXT_SUFFIXES = {".md", ".yaml", ".yml", ".json", ".py", ".Dockerfile", ".dockerignore", ".txt", ""}


def _documents() -> list[Path]:
    files = [REPO / "README.md"]
    for root in DOC_ROOTS:
        files += [
            p
            for p in sorted((REPO / root).rglob("*"))
            if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name.endswith("Dockerfile")) and "__pycache__" not in p.parts
        ]
    return files


def test_api_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_api_docs.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_reference_covers_every_rpc_message_and_enum() -> None:
    from acroscreen.v1 import screening_pb2 as pb

    text = (REPO / "docs" / "API.md").read_text()
    for name in pb.DESCRIPTOR.message_types_by_name:
        assert f"#### `{name}`" in text
    for name in pb.DESCRIPTOR.enum_types_by_name:
        assert f"#### `{name}`" in text
    for method in pb.DESCRIPTOR.services_by_name["Screening"].methods:
        assert f"| `{method.name}` |" in text
    assert "subject_id longer" not in text  # only comments of the .proto, nothing invented
    assert "At most 128 characters." in text


def test_every_env_name_in_docs_and_deploy_is_read_by_the_server() -> None:
    known = set(env_names())
    seen: dict[str, set[str]] = {}
    for path in _documents():
        for name in ENV_NAME.findall(path.read_text(errors="replace")):
            seen.setdefault(name, set()).add(str(path.relative_to(REPO)))
    unknown = {name: sorted(where) for name, where in seen.items() if name not in known}
    assert not unknown, f"variables the server does not read: {unknown}"
    assert {"ACROSCREEN_MODEL", "ACROSCREEN_HOST", "ACROSCREEN_GRACE_PERIOD_S", "ACROSCREEN_DEVICE"} <= set(seen)


def test_repository_paths_named_in_docs_exist() -> None:
    pattern = re.compile(r"(?<![\w./-])((?:deploy|docs|examples|scripts|client|server|protos|tests)/[\w./-]*[\w/])")
    missing = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "README.md"]:
        for name in pattern.findall(path.read_text()):
            name = name.rstrip(".")
            if "*" in name or name.startswith("server/weights"):  # weights: produced before an image build
                continue
            if not (REPO / name).exists():
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_examples_compile_and_use_only_the_client(example: str) -> None:
    source = (REPO / "examples" / example).read_text()
    tree = ast.parse(source)
    compile(tree, example, "exec")
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    project = {m for m in modules if m.startswith("acroscreen")}
    assert project and all(m.startswith("acroscreen.client") for m in project), project
    assert ast.get_docstring(tree), "each example says what it shows and how to run it"
    assert 'if __name__ == "__main__":' in source
