"""A small local stand-in for the part of the Hugging Face Hub HTTP API that huggingface_hub's `create_repo`,
`upload_folder` (regular files as base64 in the commit, large files through the LFS basic transfer),
`snapshot_download` and `hf_hub_download` use. There is no Hub here; point huggingface_hub at this server with
HF_ENDPOINT (and HF_HUB_DISABLE_XET=1: the Xet transfer needs Hugging Face's storage service, not emulated).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png")


class Hub:
    def __init__(self):
        self.repos = {}  # repo id -> {"files": {path: bytes}, "sha": str, "private": bool}
        self.lfs = {}  # sha256 hex -> bytes
        self.requests = []  # (method, path, authorization header)
        self.lock = threading.Lock()

    def start(self):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # --- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status=200, payload=None, body=None, headers=None):
        if payload is not None:
            body = json.dumps(payload).encode()
        body = body or b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self):
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

    # --- routes
    def do_POST(self):
        self._record()
        path, body = urlparse(self.path).path, self._body()
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            with self.hub.lock:
                if repo_id in self.hub.repos:
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{self.hub.endpoint}/{repo_id}"})
                self.hub.repos[repo_id] = {"files": {}, "sha": uuid.uuid4().hex + "0" * 8,
                                           # huggingface_hub >= 2 sends "visibility", 1.x "private"
                                           "private": request.get("visibility") == "private"
                                           or request.get("private") is True}
            return self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._send(200, {})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                 "shouldIgnore": False, "oid": None} for f in files]})
        if match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            objects = json.loads(body)["objects"]
            return self._send(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects]})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path):
            return self._commit(unquote(match.group(1)), body)
        return self._send(404, {"error": f"no route POST {path}"})

    def do_PUT(self):
        self._record()
        path, body = urlparse(self.path).path, self._body()
        if match := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
            if hashlib.sha256(body).hexdigest() != match.group(1):
                return self._send(400, {"error": "sha256 mismatch"})
            with self.hub.lock:
                self.hub.lfs[match.group(1)] = body
            return self._send(200, {})
        return self._send(404, {"error": f"no route PUT {path}"})

    def _commit(self, repo_id, body):
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
            if repo is None:
                return self._send(404, {"error": "Repository not found"})
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    repo.setdefault("messages", []).append(value["summary"])
                elif item["key"] == "file":
                    repo["files"][value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    repo["files"][value["path"]] = self.hub.lfs[value["oid"]]
            repo["sha"] = uuid.uuid4().hex + "0" * 8
        return self._send(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{repo['sha']}",
                                "commitOid": repo["sha"], "pullRequestUrl": None})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self._record()
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/[^/]+", path):
            repo = self.hub.repos.get(match.group(1))
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
            return self._send(200, {"id": match.group(1), "sha": repo["sha"], "private": repo.get("private", False),
                                    "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path):
            files = self.hub.repos[match.group(1)]["files"]
            return self._send(200, [self._tree_entry(p, data) for p, data in sorted(files.items())])
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            repo = self.hub.repos.get(match.group(1))
            data = repo and repo["files"].get(match.group(2))
            if data is None:
                return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
            etag = hashlib.sha256(data).hexdigest() if match.group(2).endswith(LFS_SUFFIXES) else _git_blob_id(data)
            return self._send(200, body=data, headers={"ETag": f'"{etag}"', "X-Repo-Commit": repo["sha"]})
        return self._send(404, {"error": f"no route GET {path}"})

    @staticmethod
    def _tree_entry(path, data):
        entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry
