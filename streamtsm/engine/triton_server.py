"""A real Triton Inference Server on 127.0.0.1, from the ``nvidia-pytriton`` wheel, for tests and benchmarks.

The wheel ships a ``tritonserver`` binary (2.51) with its python backend (no onnxruntime backend), so it serves
repositories written by ``streamtsm export-triton --runtime python``. ``tools/setup_triton.sh`` installs it in a
venv of its own (``.venv-triton``: Python 3.11 or 3.13, numpy < 2, onnxruntime), because the python backend's stub
loads only under those Pythons and with numpy 1 beside it. What starting it takes, beyond the binary:

- the backend directory: the wheel's ``backends/python`` plus the stub built for the venv's Python
  (``python_backend_stubs/3.X/triton_python_backend_stub``), assembled in a work directory;
- ``LD_LIBRARY_PATH`` naming the wheel's bundled libraries (``nvidia_pytriton.libs``): a copied stub loses the
  relative run path it was built with; and the venv's base Python's ``lib`` when it holds ``libpython3.X.so.1.0``
  (else the system's is used, as the stub links it);
- ``PATH`` starting with the venv's ``bin``: the stub's embedded Python finds its site-packages (numpy,
  onnxruntime) through the ``python`` it sees there.

On a machine without a GPU the server logs CUDA, NVML and DCGM errors; they are harmless. Nothing here imports
torch or tritonclient.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import StreamTSMError

ENV_VAR = "STREAMTSM_TRITON_ENV"  # a venv made by tools/setup_triton.sh, when not <project>/.venv-triton
STUB_PYTHONS = ("3.11", "3.13")  # the stubs that load (measured); the wheel ships others that do not


class TritonServerError(StreamTSMError):
    """The local server could not be found or started; the message says why."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the wheel's server are.

    Attributes:
        env: the venv (``.venv-triton``).
        binary: ``tritonserver``.
        python_backend: the wheel's ``backends/python`` (without a stub).
        stub: the python backend stub for the venv's Python.
        libs: the wheel's bundled shared libraries.
        python_version: ``"3.11"`` or ``"3.13"``.
    """

    env: Path
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path
    python_version: str


def default_env(project_root: str | os.PathLike | None = None) -> Path:
    """``$STREAMTSM_TRITON_ENV``, else ``<project root>/.venv-triton``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    root = Path(project_root) if project_root else Path(__file__).resolve().parents[2]
    return root / ".venv-triton"


def find_install(env: str | os.PathLike | None = None) -> TritonInstall:
    """Locate the server inside the venv ``env`` (default: :func:`default_env`).

    Raises:
        TritonServerError: the venv, the wheel or one of its pieces is missing (the message says which, and that
            ``tools/setup_triton.sh`` makes it).
    """
    env = Path(env) if env else default_env()
    hint = "run tools/setup_triton.sh (it makes .venv-triton with nvidia-pytriton)"
    if not (env / "bin" / "python").exists():
        raise TritonServerError(f"no Triton server environment at {env} ({hint})")
    found = sorted(env.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
    if not found:
        raise TritonServerError(f"{env} has no nvidia-pytriton wheel ({hint})")
    root = found[-1]
    python_version = root.parents[2].name.removeprefix("python")  # lib/python3.11/site-packages/pytriton/...
    if python_version not in STUB_PYTHONS:
        raise TritonServerError(f"{env} is Python {python_version}; Triton's python backend stub loads only under "
                                f"{' or '.join(STUB_PYTHONS)} ({hint})")
    install = TritonInstall(env=env, binary=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                            stub=root / "python_backend_stubs" / python_version / "triton_python_backend_stub",
                            libs=root.parents[1] / "nvidia_pytriton.libs", python_version=python_version)
    for what, path in (("server binary", install.binary), ("python backend", install.python_backend),
                       ("python backend stub", install.stub), ("bundled libraries", install.libs)):
        if not path.exists():
            raise TritonServerError(f"the nvidia-pytriton wheel in {env} has no {what} at {path} ({hint})")
    return install


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTritonServer:
    """``tritonserver`` on 127.0.0.1 with free ports, serving ``repository``; a context manager.

    Args:
        repository: the model repository.
        install: from :func:`find_install` (found in the default venv when None).
        log_path: where the server's output goes (a file in the work directory when None).
        extra_args: more ``tritonserver`` options.

    Attributes (once started): ``grpc_url`` (``127.0.0.1:PORT``, what ``run --backend triton --url`` takes),
    ``http_url``, ``log_path``.

    The server starts with ``--disable-auto-complete-config`` (configs are used as written),
    ``--exit-on-error=false`` and ``--strict-readiness=false`` (a model that fails to load is reported in the
    repository index while the others serve), and without metrics.
    """

    def __init__(self, repository: str | os.PathLike, *, install: TritonInstall | None = None,
                 log_path: str | os.PathLike | None = None, extra_args: list[str] | None = None) -> None:
        self.repository = Path(repository)
        self.install = install or find_install()
        self._work = Path(tempfile.mkdtemp(prefix="streamtsm-triton-"))
        self.log_path = Path(log_path) if log_path else self._work / "tritonserver.log"
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.grpc_url = self.http_url = ""

    def _backends(self) -> Path:
        backends = self._work / "backends"
        python = backends / "python"
        if not python.exists():
            shutil.copytree(self.install.python_backend, python)
            shutil.copy2(self.install.stub, python / "triton_python_backend_stub")
        return backends

    def _base_python_lib(self) -> str | None:
        """The lib directory of the venv's base Python when it holds its libpython (a pyenv or source build): the
        stub links ``libpython3.X.so.1.0``, and the one matching the venv's standard library is that one."""
        try:
            cfg = (self.install.env / "pyvenv.cfg").read_text(encoding="utf-8")
        except OSError:
            return None
        for line in cfg.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                lib = Path(value.strip()).parent / "lib"
                if (lib / f"libpython{self.install.python_version}.so.1.0").exists():
                    return str(lib)
        return None

    def _env(self) -> dict:
        env = dict(os.environ)
        libs = str(self.install.libs)
        if base := self._base_python_lib():
            libs = f"{libs}:{base}"
        env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
        env["PATH"] = f"{self.install.env / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the project's, not the server's Python
            env.pop(name, None)
        return env

    def start(self, timeout_s: float = 60.0) -> "LocalTritonServer":
        """Start the server and wait until it is live (models may still fail: see :meth:`model_states`).

        Raises:
            TritonServerError: it exited or did not answer within ``timeout_s``; the message ends with its log's
                last lines.
        """
        backends = self._backends()
        for attempt in range(3):  # a port taken between free_port() and the server's bind: try new ones
            http, grpc, metrics = free_port(), free_port(), free_port()
            args = [str(self.install.binary), f"--model-repository={self.repository}",
                    f"--backend-directory={backends}", "--http-address=127.0.0.1", f"--http-port={http}",
                    "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
                    "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                    "--disable-auto-complete-config", "--exit-on-error=false", "--strict-readiness=false",
                    "--exit-timeout-secs=5",
                    *self.extra_args]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self._env(), start_new_session=True)
            self.http_url, self.grpc_url = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}"
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self._get("/v2/health/live") == 200:
                    return self
                time.sleep(0.1)
            else:
                self.stop()
                raise TritonServerError(f"tritonserver did not become live within {timeout_s:g} s{self._tail()}")
            if "already in use" not in self.log_text() or attempt == 2:
                raise TritonServerError(f"tritonserver exited with status {self.process.returncode}{self._tail()}")
        raise AssertionError("unreachable")

    def _get(self, path: str, timeout: float = 2.0) -> int | None:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def wait_model_ready(self, name: str, timeout_s: float = 30.0) -> None:
        """Wait until model ``name`` is READY.

        Raises:
            TritonServerError: it is not ready in time (the message gives its state and reason from the index).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._get(f"/v2/models/{name}/ready") == 200:
                return
            state = self.model_states().get(name)
            if state and state[0] == "UNAVAILABLE":
                break
            time.sleep(0.1)
        raise TritonServerError(f"model {name!r} is not ready: {self.model_states().get(name)}{self._tail()}")

    def model_states(self) -> dict[str, tuple[str, str]]:
        """``{name: (state, reason)}`` from the server's repository index."""
        request = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                index = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return {m["name"]: (m.get("state", ""), m.get("reason", "")) for m in index}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _tail(self, lines: int = 15) -> str:
        text = self.log_text().strip().splitlines()[-lines:]
        return ("; its log ends:\n" + "\n".join(text)) if text else ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (it unloads its models, ending their stub processes), SIGKILL after ``timeout_s``."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)  # its own session: the stubs it started go too
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "LocalTritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()
