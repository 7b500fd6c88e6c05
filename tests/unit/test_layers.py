"""Imports go one way: runtime → service → transport; the client never imports the server
(except the CLI, lazily, inside the server verbs)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "server/runtime": ("grpc", "acroscreen.v1", "google.protobuf", ".service", "..service", "..transport", ".transport"),
    "server/service": ("grpc", "acroscreen.v1", "google.protobuf", "torch", "..transport", ".transport"),
    "server/transport": ("torch", "cv2", "dlib", "..runtime.model", "..runtime.preprocess"),
    "client": ("acroscreen.server.runtime", "acroscreen.server.service", "acroscreen.server.transport", "torch", "dlib"),
}


def _imports(path: Path, module_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports(folder: str) -> None:
    bad = []
    for path in sorted((REPO / folder).glob("*.py")):
        # The CLI may import server code inside the server verbs' functions, never at load time.
        for name in _imports(path, module_level_only=path.name == "cli.py"):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, bad
