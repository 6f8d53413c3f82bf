"""A real ComfyUI server in a subprocess: ``.comfyui/main.py --cpu`` on a free loopback port, with
a ``--base-directory`` whose ``custom_nodes/`` holds the pack (a symlink to the repo, else a copy).

Used by the server tests (``tests/conftest.py``'s ``comfy_server`` fixture and the module fixtures),
the browser tests and ``scripts/demo.py``. Nothing here imports ComfyUI: the server is ComfyUI's own
``main.py``, driven over HTTP (``POST /prompt``, ``/history``, ``/object_info``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .host import COMFYUI_DIR, PACK_DIR_NAME, REPO_ROOT, require_host_files

if TYPE_CHECKING:
    import requests

MODEL_SUBDIRS = ("checkpoints", "loras", "diffusion_models", "unet", "text_encoders", "clip", "vae", "embeddings", "configs")


class ServerStartError(RuntimeError):
    """The server exited during start-up or did not answer ``/object_info`` in time (message: log tail)."""

class PromptRejected(RuntimeError):
    """``POST /prompt`` refused the workflow (HTTP 4xx); ``.response`` holds the decoded JSON body."""

    def __init__(self, status: int, response: Any) -> None:
        super().__init__(f"/prompt answered HTTP {status}: {json.dumps(response)[:2000]}")
        self.status = status
        self.response = response


class PromptFailed(RuntimeError):
    """A prompt ran but ended with status "error"; ``.entry`` is its ``/history`` entry."""

    def __init__(self, prompt_id: str, entry: dict[str, Any]) -> None:
        messages = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        super().__init__(f"prompt {prompt_id} failed: {json.dumps(messages)[:4000]}")
        self.entry = entry


@dataclass
class ComfyServer:
    """A running ``main.py`` subprocess bound to a loopback port."""

    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    pack_dir_name: str = PACK_DIR_NAME
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _http: requests.Session | None = field(default=None, repr=False)
    _object_info: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def http(self) -> requests.Session:
        """A ``requests`` session that ignores proxy environment variables (loopback only)."""
        if self._http is None:
            import requests

            self._http = requests.Session()
            self._http.trust_env = False
        return self._http

    @property
    def pack_dir(self) -> Path:
        """Where the pack sits in the server's custom_nodes/ (a symlink to the repo, or a copy)."""
        return self.base_dir / "custom_nodes" / self.pack_dir_name

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """``GET path`` and decode JSON (raises on HTTP errors)."""
        r = self.http.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def object_info(self, refresh: bool = False) -> dict[str, Any]:
        """``/object_info``: every node class the server registered (cached)."""
        if self._object_info is None or refresh:
            self._object_info = self.get("/object_info", timeout=60.0)
        return self._object_info

    def post_prompt(self, api_workflow: dict[str, Any]) -> str:
        """Queue an API-format workflow; returns its prompt id or raises :class:`PromptRejected`."""
        r = self.http.post(self.url + "/prompt", json={"prompt": api_workflow, "client_id": self.client_id}, timeout=30.0)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code != 200:
            raise PromptRejected(r.status_code, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry.

        The entry has ``outputs`` and ``status`` (``status_str`` "success" or "error",
        ``messages``). Raises ``TimeoutError`` (with the log tail) or ``RuntimeError`` if
        the server died.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.process.returncode}) while waiting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def run(self, api_workflow: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Queue, wait, and require success; returns the history entry (raises :class:`PromptFailed`)."""
        prompt_id = self.post_prompt(api_workflow)
        entry = self.wait(prompt_id, timeout)
        if entry["status"].get("status_str") != "success":
            raise PromptFailed(prompt_id, entry)
        return entry

    def log_text(self) -> str:
        """The whole server log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        """The last ``lines`` lines of the server log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_line(self) -> str | None:
        """The "Import times for custom nodes" line for our pack, or None if it was never tried."""
        return find_pack_import_line(self.log_text(), str(self.pack_dir))

    def pack_import_errors(self) -> list[str]:
        """Log lines saying our pack failed to load (empty when it loaded cleanly)."""
        return pack_import_errors(self.log_text(), str(self.pack_dir))

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        if self.process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._http is not None:
            self._http.close()


def find_pack_import_line(log: str, pack_path: str) -> str | None:
    """The line of ComfyUI's import-times table naming ``pack_path`` (``"  0.1 seconds: <path>"``)."""
    pattern = re.compile(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: " + re.escape(pack_path) + r"\s*$")
    return next((line for line in log.splitlines() if pattern.match(line)), None)


def pack_import_errors(log: str, pack_path: str) -> list[str]:
    """Lines of a ComfyUI log reporting that the custom node at ``pack_path`` did not load.

    Covers ``Cannot import <path> module for custom nodes``, V3 ``comfy_entrypoint``
    warnings, "Skip <path> ... lack of NODE_CLASS_MAPPINGS" and the ``(IMPORT FAILED)``
    import-times line. Failures of other modules (e.g. comfy_extras needing torchaudio)
    are ignored.
    """
    startup = log.split("\nStarting server", 1)[0]  # later lines are execution logs, not imports
    lines = startup.splitlines()
    markers = ("Cannot import", "IMPORT FAILED", "comfy_entrypoint", "Skip ", "Error while")
    errors: list[str] = []
    for i, line in enumerate(lines):
        if pack_path in line and any(m in line for m in markers):
            if "Cannot import" in line:  # ComfyUI logs the traceback just before this line
                start = max((j for j in range(i) if lines[j].startswith("Traceback")), default=i)
                errors.extend(lines[start:i])
            errors.append(line)
    if find_pack_import_line(log, pack_path) is None:
        errors.append(f"no import-times line for {pack_path}: ComfyUI never tried to load it")
    return errors


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base_dir: Path, pack_root: Path = REPO_ROOT, pack_dir_name: str = PACK_DIR_NAME) -> Path:
    """Lay out a ComfyUI ``--base-directory``: custom_nodes/<pack> (symlink, else copy), models/*, input/, output/."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / pack_dir_name
    if not link.exists():
        try:
            link.symlink_to(pack_root, target_is_directory=True)
        except OSError:
            shutil.copytree(pack_root, link, ignore=shutil.ignore_patterns(
                ".git", ".venv", ".comfyui", ".comfyui.partial", "__pycache__", ".pytest_cache", ".hypothesis"))
    for sub in MODEL_SUBDIRS:
        (base_dir / "models" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user"):
        (base_dir / sub).mkdir(exist_ok=True)
    return base_dir


def start_comfy_server(base_dir: Path, *, startup_timeout: float = 90.0, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start ``.comfyui/main.py --cpu`` on a free loopback port with ``base_dir`` as base directory.

    Waits until ``/object_info`` answers; on failure stops the process and raises
    :class:`ServerStartError` with the log tail (:class:`~prolora_dev.host.HostNotReady` when
    ``.comfyui`` is not set up). The caller must call :meth:`ComfyServer.stop`.
    """
    require_host_files()
    prepare_base_dir(base_dir)
    port = free_loopback_port()
    log_path = base_dir / "comfyui.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base_dir), "--disable-api-nodes", "--database-url", "sqlite:///:memory:", *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # ComfyUI's dir must be sys.path[0], nothing of ours before it
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    server = ComfyServer(url=f"http://127.0.0.1:{port}", base_dir=base_dir, log_path=log_path, process=process)
    import requests

    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            server.stop()
            raise ServerStartError(f"ComfyUI server exited with {process.returncode} during start-up:\n{server.log_tail()}")
        try:
            server.object_info()
            return server
        except (requests.ConnectionError, requests.Timeout):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(f"ComfyUI server did not answer /object_info within {startup_timeout}s:\n{server.log_tail()}")
        time.sleep(0.25)
