"""The images' install steps, run without a Docker engine: the build stage's COPY instructions
lay out a build context in a temporary directory, and its `install.sh` steps run there with
the same arguments the Dockerfile gives them.

- default run: the package step's artefact, a wheel of the copied sources, holds the demo
  weights under acroscreen/server/ and no stray top-level packages, and the image's weights
  check passes against it;
- `slow`: every step into a fresh venv (torch 2.13.0 from this machine's wheel directory, as
  `make` takes it; the CPU image's index URL is not reachable here), then the installed
  `acroscreen serve --help` and `check_weights.py --torch cpu` answer.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tests.unit.test_deploy_docker import _args, _stages, install_steps, parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "cpu.Dockerfile"
WEIGHTS = "acroscreen/server/weights/phantom-demo.safetensors"


def lay_out_build_stage(root: Path) -> list[list[str]]:
    """Copy what the build stage COPYs (under `root` as if it were /), return its install steps
    with absolute paths moved under `root` and the ARG defaults filled in (no index URL)."""
    instructions = parse_dockerfile(DOCKERFILE)
    workdir = PurePosixPath("/")
    for ins in _stages(instructions)["build"]:
        if ins.keyword == "WORKDIR":
            workdir = workdir / ins.args
        elif ins.keyword == "COPY":
            *sources, target = ins.args.split()
            destination = root / str(workdir / target).lstrip("/")
            for source in sources:
                path = REPO / source
                if path.is_dir():
                    shutil.copytree(path, destination if target.endswith("/") else destination / path.name,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
                else:
                    into = destination / path.name if target.endswith("/") else destination
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, into)
    values = {**_args(instructions), "TORCH_INDEX_URL": "", "REQUIRE_DEMO_WEIGHTS": "1"}

    def resolve(word: str) -> str:
        for name, value in values.items():
            word = word.replace("${" + name + "}", value)
        return str(root / word.lstrip("/")) if word.startswith("/") else word

    return [[resolve(word) for word in step] for step in install_steps(instructions)]


def test_the_package_step_builds_a_wheel_with_the_weights_and_nothing_stray(tmp_path: Path) -> None:
    root = tmp_path / "image"
    (_, package_step) = lay_out_build_stage(root)
    source = Path(package_step[3])
    assert (source / "pyproject.toml").is_file() and (source / "deploy/docker/check_weights.py").is_file()
    started = time.monotonic()
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("acroscreen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert WEIGHTS in names, "the demo weights are not in the wheel"
    assert WEIGHTS.replace(".safetensors", ".int8.json") in names, "the demo weights' int8 scales are not in the wheel"
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"acroscreen", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top_level
    assert "acroscreen/server/main.py" in names and "acroscreen/client/cli.py" in names
    assert "acroscreen/v1/screening.proto" in names
    assert not [name for name in names if "/tests/" in name or name.endswith(".pyc")]

    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # -S: no site-packages, so the dev checkout's editable install cannot answer instead
    check = subprocess.run(
        [sys.executable, "-S", str(source / "deploy/docker/check_weights.py"), "--require", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert check.returncode == 0, check.stderr
    assert f"demo weights baked in: {unpacked / WEIGHTS}" in check.stdout
    (unpacked / WEIGHTS).unlink()
    missing = subprocess.run(
        [sys.executable, "-S", str(source / "deploy/docker/check_weights.py"), "--require", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert missing.returncode == 1 and "REQUIRE_DEMO_WEIGHTS=0" in missing.stderr
    print(f"\nwheel of the build context: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_the_install_steps_make_a_working_server_venv(tmp_path: Path) -> None:
    root = tmp_path / "image"
    steps = lay_out_build_stage(root)
    env_dir = tmp_path / "venv"
    started = time.monotonic()
    venv.create(env_dir, with_pip=True)
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(env_dir)}
    env.pop("PYTHONPATH", None)
    timings = {"venv": time.monotonic() - started}
    for step in steps:
        began = time.monotonic()
        result = subprocess.run(step, cwd=root / "src", capture_output=True, text=True, timeout=1200, env=env)
        assert result.returncode == 0, f"{shlex.join(step)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        timings[step[2]] = time.monotonic() - began
    assert "demo weights baked in" in result.stdout and "CUDA None" in result.stdout  # the package step's check

    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, importlib.util as u; "
         "print(m.version('torch'), u.find_spec('av') is None, u.find_spec('pytest') is None, "
         "u.find_spec('acroscreen.server').origin)"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert installed.returncode == 0, installed.stderr
    torch_version, no_av, no_pytest, origin = installed.stdout.split()
    assert torch_version.startswith("2.13.0") and no_av == "True" and no_pytest == "True"
    assert origin.startswith(str(env_dir)), f"not installed into the venv (editable?): {origin}"
    serve = subprocess.run([str(env_dir / "bin" / "acroscreen"), "serve", "--help"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert serve.returncode == 0 and "ACROSCREEN_MODEL" in serve.stdout, serve.stderr[-2000:]
    print("\ninstall steps into a fresh venv: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
          + f", total {time.monotonic() - started:.0f} s")
