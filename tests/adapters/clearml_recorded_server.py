"""A recorded ClearML API endpoint on 127.0.0.1 for the ClearML adapter tests.

A ClearML server needs Docker, which these machines lack. This module answers
the API calls that the real ``clearml`` client sends while a test opens a task
and the adapter registers output models and artifacts on it, with replies
shaped after what a clearml-server 1.16 returns (``meta`` plus ``data``). It
keeps just enough state (tasks, models) for the client to read back what it
wrote, and records every request so a test can assert on what the real client
sent: that is the read-back.

Endpoints it does not know are answered with an empty ``data`` object and
recorded like the others; :attr:`RecordedClearMLServer.unknown` lists them.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

API_VERSION = "2.23"
FILES_UPLOAD = "files.upload"
"""Pseudo endpoint under which uploads to the files server are recorded."""
SERVER_VERSION = "1.16.0"

_TASK_DEFAULTS: dict[str, Any] = {
    "status": "created",
    "type": "training",
    "tags": [],
    "system_tags": [],
    "output": {},
    "execution": {"artifacts": []},
    "models": {"input": [], "output": []},
    "hyperparams": {},
    "configuration": {},
    "runtime": {},
    "script": {},
    "last_iteration": 0,
}


def _b64(payload: dict[str, Any]) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned_token() -> str:
    # The client decodes the JWT without checking its signature to learn the
    # API level; no "exp" claim means the token never expires.
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "env": "test",
        "api_version": API_VERSION,
        "server_version": SERVER_VERSION,
    }
    return f"{_b64(header)}.{_b64(claims)}.c2lnbmF0dXJl"


@dataclass(frozen=True)
class RecordedRequest:
    """One API call the client sent: endpoint name and decoded JSON body."""

    endpoint: str
    body: Any


@dataclass
class RecordedClearMLServer:
    """Answer ClearML API calls on 127.0.0.1 and record them.

    Use as a context manager; :meth:`write_config` writes a ``clearml.conf``
    pointing the client at it.
    """

    requests: list[RecordedRequest] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> RecordedClearMLServer:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Keep the test output quiet."""

            def do_GET(self) -> None:
                self._answer()

            do_POST = do_PUT = do_GET

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                if self.command == "POST" and _is_file_upload(self.headers):
                    # The files server: record where the bytes went, not them.
                    body = {"path": path, "size": len(raw)}
                    status, data = server.answer(FILES_UPLOAD, body)
                else:
                    endpoint = path.strip("/").split("/")[-1]
                    status, data = server.answer(endpoint, _decode(raw))
                reply = json.dumps(_envelope(path, status, data)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        """Base URL of the endpoint, ``http://127.0.0.1:PORT``."""
        assert self._httpd is not None, "start the server with `with` first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def write_config(self, path: Path) -> Path:
        """Write a ``clearml.conf`` for this endpoint with dummy credentials."""
        path.write_text(
            "api {\n"
            f"  api_server: {self.url}\n"
            f"  web_server: {self.url}\n"
            f"  files_server: {self.url}\n"
            '  credentials { access_key: "dummy", secret_key: "dummy" }\n'
            "  http { retries { total: 1, connect: 1, read: 1, status: 1,"
            " backoff_factor: 0.0 } }\n"
            "}\n"
            "sdk { development { report_use_subprocess: false } }\n"
        )
        return path

    # -- read-back ---------------------------------------------------------

    @property
    def unknown(self) -> list[str]:
        """Endpoints that were called but have no crafted reply."""
        with self._lock:
            seen = {r.endpoint for r in self.requests}
        return sorted(seen - {*self._handlers(), FILES_UPLOAD})

    # -- replies -----------------------------------------------------------

    def answer(self, endpoint: str, body: Any) -> tuple[int, dict[str, Any]]:
        """Record one request and build its reply."""
        with self._lock:
            self.requests.append(RecordedRequest(endpoint, body))
            handler = self._handlers().get(endpoint)
            if handler is None:
                return 200, {}
            try:
                return 200, handler(body)
            except KeyError as missing:
                return 400, {"error": f"unknown id {missing}"}

    def _handlers(self) -> dict[str, Callable[[Any], dict[str, Any]]]:
        return {
            "auth.login": lambda body: {"token": _unsigned_token()},
            "projects.get_all": self._projects_get_all,
            "projects.get_by_id": self._projects_get_by_id,
            "tasks.create": self._tasks_create,
            "tasks.get_by_id": lambda body: {"task": self.tasks[body["task"]]},
            "tasks.get_all": self._tasks_get_all,
            "tasks.edit": self._tasks_edit,
            "tasks.started": lambda body: self._task_status(body, "in_progress"),
            "tasks.completed": lambda body: self._task_status(body, "completed"),
            "tasks.failed": lambda body: self._task_status(body, "failed"),
            "tasks.stopped": lambda body: self._task_status(body, "stopped"),
            "tasks.add_or_update_artifacts": self._tasks_add_artifacts,
            "tasks.add_or_update_model": self._tasks_add_model,
            "models.create": self._models_create,
            "models.get_by_id": lambda body: {"model": self.models[body["model"]]},
            "models.edit": self._models_edit,
            "models.add_or_update_metadata": self._models_add_metadata,
            "models.delete": self._models_delete,
        }

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):04d}"

    def _projects_get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"projects": [{"id": "project0001", "name": "lamin-lightning"}]}

    def _projects_get_by_id(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"project": {"id": body["project"], "name": "lamin-lightning"}}

    def _tasks_create(self, body: dict[str, Any]) -> dict[str, Any]:
        task_id = self._new_id("task")
        task = copy.deepcopy(_TASK_DEFAULTS)
        self.tasks[task_id] = {**task, "project": "project0001", **body}
        self.tasks[task_id]["id"] = task_id
        return {"id": task_id}

    def _tasks_get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("id") or list(self.tasks)
        return {"tasks": [self.tasks[i] for i in wanted if i in self.tasks]}

    def _tasks_edit(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks[body["task"]]
        task.update({k: v for k, v in body.items() if k not in ("task", "force")})
        return {"updated": 1, "fields": {}}

    def _task_status(self, body: dict[str, Any], status: str) -> dict[str, Any]:
        self.tasks[body["task"]]["status"] = status
        return {"updated": 1, "fields": {"status": status}}

    def _tasks_add_artifacts(self, body: dict[str, Any]) -> dict[str, Any]:
        artifacts = self.tasks[body["task"]]["execution"].setdefault("artifacts", [])
        names = {a["key"] for a in body["artifacts"]}
        artifacts[:] = [a for a in artifacts if a["key"] not in names]
        artifacts.extend(body["artifacts"])
        return {"updated": 1}

    def _tasks_add_model(self, body: dict[str, Any]) -> dict[str, Any]:
        models = self.tasks[body["task"]]["models"].setdefault(body["type"], [])
        models[:] = [m for m in models if m["name"] != body["name"]]
        models.append({"name": body["name"], "model": body["model"]})
        return {"updated": 1}

    def _models_create(self, body: dict[str, Any]) -> dict[str, Any]:
        model_id = self._new_id("model")
        self.models[model_id] = {"tags": [], "system_tags": [], **body}
        self.models[model_id]["id"] = model_id
        return {"id": model_id, "created": True}

    def _models_edit(self, body: dict[str, Any]) -> dict[str, Any]:
        self.models[body["model"]].update(
            {k: v for k, v in body.items() if k != "model"}
        )
        return {"updated": 1, "fields": {}}

    def _models_add_metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        metadata = self.models[body["model"]].setdefault("metadata", {})
        for item in body["metadata"]:
            metadata[item["key"]] = item
        return {"updated": 1}

    def _models_delete(self, body: dict[str, Any]) -> dict[str, Any]:
        # clearml-server drops the model from its creating task's outputs
        # (unless that task is published) and deletes it.
        model = self.models.pop(body["model"])
        task = self.tasks.get(model.get("task", ""))
        if task is not None:
            outputs = task["models"].get("output", [])
            outputs[:] = [m for m in outputs if m["model"] != model["id"]]
        return {"deleted": True, "url": model.get("uri")}


def _is_file_upload(headers: Any) -> bool:
    return "multipart/form-data" in (headers.get("Content-Type") or "")


def _decode(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        # events.add_batch sends one JSON object per line
        return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _envelope(endpoint: str, status: int, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": {
            "id": "recorded",
            "trx": "recorded",
            "endpoint": {
                "name": endpoint,
                "requested_version": API_VERSION,
                "actual_version": API_VERSION,
            },
            "result_code": status,
            "result_subcode": 0,
            "result_msg": "OK" if status == 200 else data.get("error", ""),
            "error_stack": "",
        },
        "data": data,
    }
