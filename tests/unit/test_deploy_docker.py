"""deploy/docker and deploy/compose*.yaml, checked without a Docker engine: the Dockerfiles are
parsed, and what they install, expose, configure and run is compared with the real project
(pyproject extras, Settings and env_names(), the CLI's verbs, the package data)."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import yaml
from acroscreen.server.config import Settings, env_names

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
IMAGES = ("cpu", "gpu")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (no parser directives used
    but `# syntax=`)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def _stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    names: dict[int, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.args.split()
            names[ins.stage] = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(ins.stage)
    stages: dict[str, list[Instruction]] = {name: [] for name in names.values()}
    for ins in instructions:
        if ins.stage >= 0:
            stages[names[ins.stage]].append(ins)
    return stages


def _args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults, global and per stage (later wins)."""
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            values[name] = value.strip('"')
    return values


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def _json_list(args: str) -> list[str]:
    import json

    value = json.loads(args)
    assert isinstance(value, list), f"exec form expected: {args}"
    return value


@pytest.fixture(scope="module", params=IMAGES)
def image(request: pytest.FixtureRequest) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKER / f"{request.param}.Dockerfile")


def _pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def test_multi_stage_build_with_a_lean_runtime_stage(image: tuple[str, list[Instruction]]) -> None:
    kind, instructions = image
    stages = _stages(instructions)
    assert list(stages) == ["build", "runtime"]
    args = _args(instructions)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ins.args.split()[0]) for ins in instructions if ins.keyword == "FROM"]
    if kind == "gpu":
        assert all(base.startswith("nvidia/cuda:") for base in bases), bases
        assert "cu12" in args["TORCH_INDEX_URL"]
    else:
        assert all(re.match(r"python:3\.1[1-9]-slim", base) for base in bases), bases
        assert args["TORCH_INDEX_URL"].endswith("/cpu")
    assert bases[0] == bases[1], "the venv is copied between stages: same base, same Python"

    runtime = stages["runtime"]
    runs = " ".join(ins.args for ins in runtime if ins.keyword == "RUN")
    assert "pip install" not in runs and "build-essential" not in runs and "gcc" not in runs
    copies = [ins.args for ins in runtime if ins.keyword == "COPY"]
    assert "--from=build /opt/acroscreen /opt/acroscreen" in copies
    assert not any(c.split()[-2].startswith(("server", "client", "protos", ".")) for c in copies if "--from" not in c)


def install_steps(instructions: list[Instruction]) -> list[list[str]]:
    """The build stage's `sh /tmp/install.sh STEP ...` commands, split as the shell splits them."""
    build = _stages(instructions)["build"]
    return [shlex.split(ins.args) for ins in build if ins.keyword == "RUN" and "install.sh" in ins.args]


def test_installs_the_server_extra_only(image: tuple[str, list[Instruction]]) -> None:
    kind, instructions = image
    build = _stages(instructions)["build"]
    # every install goes through install.sh, the script CI runs (tests/e2e/test_image_install.py)
    assert not [ins.args for ins in build if ins.keyword == "RUN" and "pip install" in ins.args]
    steps = install_steps(instructions)
    assert [step[:3] for step in steps] == [["sh", "/tmp/install.sh", "torch"], ["sh", "/tmp/install.sh", "package"]]
    torch_step, package_step = steps
    assert torch_step[3:] == ["${TORCH_VERSION}", "${TORCH_INDEX_URL}"]
    workdir = [ins.args for ins in build if ins.keyword == "WORKDIR"]
    assert package_step[3:] == [workdir[-1], "cuda" if kind == "gpu" else "cpu", "${REQUIRE_DEMO_WEIGHTS}"]
    script = (DOCKER / "install.sh").read_text()
    assert 'pip install "$1[server]"' in script, "non-editable, the server extra only"
    assert "-e " not in script and "[dev]" not in script and "media" not in script.split("set -eu")[1]
    assert 'check_weights.py" --require "$3" --torch "$2"' in script
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "server" in extras
    # the pinned torch satisfies the server extra's range
    from packaging.requirements import Requirement

    args = _args(instructions)
    (torch_req,) = [Requirement(r) for r in extras["server"] if Requirement(r).name == "torch"]
    assert torch_req.specifier.contains(args["TORCH_VERSION"]), f"torch {args['TORCH_VERSION']} outside {torch_req}"


def test_demo_weights_are_package_data_and_checked_at_build() -> None:
    from acroscreen.server.main import DEFAULT_WEIGHTS

    package_data = _pyproject()["tool"]["setuptools"]["package-data"]["acroscreen.server"]
    assert any(fnmatch.fnmatch(f"weights/{DEFAULT_WEIGHTS.name}", pattern) for pattern in package_data)
    assert f'WEIGHTS = "{DEFAULT_WEIGHTS.name}"' in (DOCKER / "check_weights.py").read_text()


def test_entrypoint_ports_env_and_user_match_the_server(image: tuple[str, list[Instruction]]) -> None:
    kind, instructions = image
    runtime = _stages(instructions)["runtime"]
    (entrypoint,) = [_json_list(ins.args) for ins in runtime if ins.keyword == "ENTRYPOINT"]
    assert entrypoint == ["acroscreen", "serve"]
    assert _pyproject()["project"]["scripts"]["acroscreen"] == "acroscreen.client.cli:main"
    from acroscreen.client.cli import _parser

    parser = _parser()
    verbs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices  # noqa: SLF001
    assert "serve" in verbs

    env = _env(runtime)
    acroscreen_env = {k: v for k, v in env.items() if k.startswith("ACROSCREEN_")}
    assert set(acroscreen_env) <= set(env_names())
    settings = Settings.load(acroscreen_env)  # parses as the server parses it
    assert settings.host == "0.0.0.0", "containers must listen on all interfaces"
    assert settings.device == ("cuda" if kind == "gpu" else "cpu")
    (expose,) = [ins.args.split() for ins in runtime if ins.keyword == "EXPOSE"]
    assert sorted(int(p) for p in expose) == sorted([settings.port, settings.metrics_port])
    assert settings.port == Settings().port and settings.metrics_port == Settings().metrics_port

    users = [ins.args for ins in runtime if ins.keyword == "USER"]
    assert users == ["10001:10001"], "numeric non-root user (Kubernetes runAsNonRoot can verify it)"
    keywords = [ins.keyword for ins in runtime]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    (healthcheck,) = [ins.args for ins in runtime if ins.keyword == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["acroscreen-healthcheck"]')
    assert any("deploy/docker/healthcheck.py /opt/acroscreen/bin/acroscreen-healthcheck" in ins.args for ins in runtime)
    assert "ACROSCREEN_MODEL" not in env, "the demo weights are the default; ACROSCREEN_MODEL is for a mounted file"


def test_copied_sources_exist_and_pass_the_dockerignore(image: tuple[str, list[Instruction]]) -> None:
    kind, instructions = image
    ignore = [
        line.strip()
        for line in (DOCKER / f"{kind}.Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for ins in instructions:
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        sources = [part for part in ins.args.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert _included(source.rstrip("/"), ignore), f"COPY {source}: excluded by the .dockerignore"
    assert not _included(".venv", ignore) and not _included("tests", ignore) and not _included(".git", ignore)


def _included(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(path, body.rstrip("/")) or fnmatch.fnmatch(path, body.rstrip("/") + "/*"):
            included = negate
    return included


# ------------------------------------------------------------------ compose


def _compose(name: str) -> dict:
    return yaml.safe_load((REPO / "deploy" / name).read_text())


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match.group(1))


def test_compose_runs_acroscreen_prometheus_and_grafana() -> None:
    compose = _compose("compose.yaml")
    services = compose["services"]
    assert set(services) == {"acroscreen", "prometheus", "grafana"}
    server = services["acroscreen"]
    assert (REPO / "deploy" / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    env = {k: str(v) for k, v in server["environment"].items()}
    assert set(env) <= set(env_names())
    settings = Settings.load({"ACROSCREEN_HOST": "0.0.0.0", **env})
    assert _seconds(server["stop_grace_period"]) >= 2 * settings.grace_period_s + 5
    for port in server["ports"] + services["prometheus"]["ports"] + services["grafana"]["ports"]:
        assert port.startswith("127.0.0.1:"), f"{port}: publish on loopback only"
    assert server["ports"] == [f"127.0.0.1:{settings.port}:{settings.port}"]
    assert str(settings.metrics_port) in server["expose"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / "deploy" / source).exists(), f"compose mounts a missing {source}"

    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "acroscreen"]
    assert job["static_configs"][0]["targets"] == [f"acroscreen:{settings.metrics_port}"]


def test_compose_gpu_override_asks_for_a_gpu() -> None:
    services = _compose("compose.gpu.yaml")["services"]
    server = services["acroscreen"]
    assert server["build"]["dockerfile"] == "deploy/docker/gpu.Dockerfile"
    env = {k: str(v) for k, v in server["environment"].items()}
    assert set(env) <= set(env_names())
    assert Settings.load(env).device == "cuda"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "dcgm-exporter" in services
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (dcgm,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "dcgm"]
    assert dcgm["static_configs"][0]["targets"] == ["dcgm-exporter:9400"]
