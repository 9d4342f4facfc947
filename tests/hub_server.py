"""A local stand-in for the Hugging Face Hub, for tests.

It speaks the HTTP routes that the real `huggingface_hub` client (and transformers through it) uses to
create a repo, upload (preupload -> optional LFS batch/PUT/verify -> NDJSON commit), read repo info and
trees, and download through `/resolve`. All client-side code under test stays the real library; only the
remote end is replaced. It binds to 127.0.0.1 on an ephemeral port and keeps everything in memory.

Upload modes: like the Hub, preupload answers "lfs" for binary/large files and files matching the repo's
`.gitattributes` LFS patterns, and "regular" (base64 inside the commit) for small text files. LFS objects go
through the git-lfs batch API with the "basic" transfer (one PUT per object). The Xet protocol is not
implemented, so clients must run with `HF_HUB_DISABLE_XET=1` (the `hub_server` fixture sets it), or the
server can be built with `lfs=False` to make every file a regular upload.

Failure injection for bad-input tests: `fail_commit_status` (e.g. 500) makes the commit endpoint fail
without applying anything; tokens not in `tokens` are refused with 401.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_mstar_test_token"
DEFAULT_USER = "mstar-tester"

LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
# The Hub seeds every new repo with this .gitattributes (abridged to the patterns that matter here).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # the Hub sends anything larger through LFS
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _front_matter(text: str) -> str | None:
    """YAML block between the leading `---` lines of a README, or None when there is none."""
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|$)", text, flags=re.DOTALL)
    return match.group(1) if match else None


@dataclass
class FileEntry:
    path: str
    size: int
    oid: str  # git blob oid (of the LFS pointer for LFS files), as the Hub reports it
    lfs_sha256: str | None = None
    pointer_size: int | None = None

    def content_key(self) -> tuple[str, str]:
        return ("lfs", self.lfs_sha256) if self.lfs_sha256 else ("git", self.oid)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of LFS objects uploaded to this repo
    pr_count: int = 0

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return self.commits[revision]
        return None


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """In-memory Hub. `start()` binds 127.0.0.1:0; `url` is the endpoint to put in HF_ENDPOINT."""

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None, lfs: bool = True):
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.orgs = orgs or {}  # user -> organisations the user may write to
        self.lfs = lfs
        self.fail_commit_status: int | None = None
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git oid -> bytes (regular files)
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> bytes
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request served
        self._upload_tickets: dict[str, tuple[str, str, int]] = {}  # ticket -> (repo key str, oid, size)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown (once per test) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ inspection helpers for tests
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Content of every file of `repo_id` at `revision` (what a download would return)."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            commit = repo.resolve(revision)
            return {path: self._content(entry) for path, entry in commit.files.items()}

    def _content(self, entry: FileEntry) -> bytes:
        kind, key = entry.content_key()
        return self.lfs_store[key] if kind == "lfs" else self.blobs[key]

    # ------------------------------------------------------------------ storage
    def _store_regular(self, path: str, data: bytes) -> FileEntry:
        oid = git_blob_oid(data)
        self.blobs[oid] = data
        return FileEntry(path=path, size=len(data), oid=oid)

    def _lfs_entry(self, path: str, sha256: str, size: int) -> FileEntry:
        pointer = LFS_POINTER_TEMPLATE.format(oid=sha256, size=size).encode()
        return FileEntry(path=path, size=size, oid=git_blob_oid(pointer), lfs_sha256=sha256, pointer_size=len(pointer))

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, FileEntry]) -> Commit:
        date = _now_iso()
        digest = hashlib.sha1()
        digest.update(json.dumps([parent, title, message, date, secrets.token_hex(8)]).encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\n".encode())
        commit = Commit(oid=digest.hexdigest(), parent=parent, title=title, message=message, date=date, files=files)
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly (tests use it to seed state); the HTTP route goes through here too."""
        with self._lock:
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            attributes = self._store_regular(".gitattributes", DEFAULT_GITATTRIBUTES.encode())
            first = self._new_commit(repo, None, "initial commit", "", {".gitattributes": attributes})
            repo.branches["main"] = first.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    # ------------------------------------------------------------------ auth
    def _user(self, headers, required: bool) -> str | None:
        auth = headers.get("authorization") or headers.get("Authorization")
        if not auth:
            if required:
                raise HttpError(401, "You must be authenticated to access this resource (no token sent).")
            return None
        token = auth[len("Bearer "):].strip() if auth.lower().startswith("bearer ") else auth.strip()
        user = self.tokens.get(token)
        if user is None:
            # The Hub's wording: the client keys on it to report a bad token instead of "repo not found".
            raise HttpError(401, "Invalid credentials in Authorization header",
                            headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        return user

    def _can_write(self, user: str, namespace: str) -> bool:
        return user == namespace or namespace in self.orgs.get(user, [])

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (user is None or not self._can_write(user, repo.owner))):
            raise HttpError(404, "Repository not found", code="RepoNotFound")
        if write and not self._can_write(user, repo.owner):
            raise HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def _gitattributes_lfs_patterns(self, commit: Commit) -> list[str]:
        entry = commit.files.get(".gitattributes")
        if entry is None:
            return []
        patterns = []
        for line in self._content(entry).decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    def _is_lfs(self, path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        if not self.lfs:
            return False
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns):
            return True
        return size > REGULAR_MAX_BYTES or b"\0" in sample

    # ------------------------------------------------------------------ routes
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(raw_path)
        query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        with self._lock:
            try:
                return self._route(method, segments, query, headers, body)
            except HttpError as err:
                out_headers = {"Content-Type": "application/json", **err.headers}
                if err.code:
                    out_headers["X-Error-Code"] = err.code
                # Header values must be one latin-1 line; the JSON body keeps the full message.
                safe = " ".join(err.message.split()).encode("ascii", "replace").decode()
                out_headers.setdefault("X-Error-Message", safe)
                return err.status, out_headers, json.dumps({"error": err.message}).encode()

    def _route(self, method, seg, query, headers, body):
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami(headers)
        if seg[:2] == ["api", "agent-harnesses"] and method == "GET":
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})  # the client's optional registry fetch
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(body)
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create(headers, body)
        if seg[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete(headers, body)
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in PLURALS:
            repo_type, repo_id, rest = PLURALS[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
            return self._repo_api(method, repo_type, repo_id, rest, query, headers, body)
        # git-lfs routes: /{prefix}{ns}/{name}.git/info/lfs/objects/...
        repo_type, offset = ("model", 0)
        if seg and seg[0] in PLURALS:
            repo_type, offset = PLURALS[seg[0]], 1
        seg = seg[offset:]
        if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"]:
            return self._lfs(method, repo_type, f"{seg[0]}/{seg[1][:-4]}", seg[5:], query, headers, body)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), headers)
        raise HttpError(404, f"Route not served by the local test Hub: {method} /{'/'.join(seg)}")

    def _json(self, status: int, payload, headers: dict | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()

    def _whoami(self, headers):
        user = self._user(headers, required=True)
        return self._json(200, {
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": f"{user}@example.invalid", "emailVerified": True, "isPro": False,
            "orgs": [{"type": "org", "name": org} for org in self.orgs.get(user, [])],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
        })

    def _validate_yaml(self, body):
        content = json.loads(body or b"{}").get("content", "")
        block = _front_matter(content)
        errors: list[str] = []
        if block is None:
            return self._json(200, {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(block)
        except yaml.YAMLError as exc:
            return self._json(400, {"errors": [{"message": f"YAML could not be parsed: {exc}"}]})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            errors.append("metadata must be a YAML mapping")
        else:
            for key in ("license", "library_name", "pipeline_tag"):
                if key in meta and not isinstance(meta[key], str):
                    errors.append(f'"{key}" must be a string')
            for key in ("tags", "datasets", "base_model"):
                value = meta.get(key)
                if value is not None and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                    errors.append(f'"{key}" must be a string or a list of strings')
            errors.extend(_model_index_errors(meta.get("model-index")))
        if errors:
            return self._json(400, {"errors": [{"message": e} for e in errors]})
        return self._json(200, {"errors": [], "warnings": []})

    def _create(self, headers, body):
        user = self._user(headers, required=True)
        payload = json.loads(body or b"{}")
        name, namespace = payload.get("name"), payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in PREFIXES:
            raise HttpError(400, f"Invalid repo type: {repo_type}")
        if not name or not REPO_NAME_RE.fullmatch(name) or "--" in name or ".." in name:
            raise HttpError(400, f"Invalid repo name: {name!r}")
        if not self._can_write(user, namespace):
            raise HttpError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        repo = self.create_repo(repo_id, repo_type, private=private)
        return self._json(200, {"url": url, "name": repo_id, "id": repo.branches["main"][:24]})

    def _delete(self, headers, body):
        user = self._user(headers, required=True)
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        self._get_repo(repo_type, repo_id, user, write=True)
        del self.repos[(repo_type, repo_id)]
        return self._json(200, {})

    def _repo_api(self, method, repo_type, repo_id, rest, query, headers, body):
        action = rest[0] if rest else None
        if method == "GET" and action in (None, "revision"):
            user = self._user(headers, required=False)
            repo = self._get_repo(repo_type, repo_id, user)
            commit = self._revision(repo, rest[1] if action == "revision" and len(rest) > 1 else "main")
            return self._json(200, self._info(repo, commit, blobs=query.get("blobs", ["false"])[0].lower() in ("1", "true")))
        if method == "GET" and action == "tree" and len(rest) >= 2:
            user = self._user(headers, required=False)
            repo = self._get_repo(repo_type, repo_id, user)
            commit = self._revision(repo, rest[1])
            path = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
            return self._json(200, self._tree(repo, commit, path, recursive, expand))
        if method == "POST" and action == "paths-info" and len(rest) >= 2:
            user = self._user(headers, required=False)
            repo = self._get_repo(repo_type, repo_id, user)
            commit = self._revision(repo, rest[1])
            form = parse_qs(body.decode())
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
            return self._json(200, self._paths_info(repo, commit, form.get("paths", []), expand))
        if method == "GET" and action == "refs":
            user = self._user(headers, required=False)
            repo = self._get_repo(repo_type, repo_id, user)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()
                        if not b.startswith("refs/")]
            return self._json(200, {"branches": branches, "tags": [], "converts": []})
        if method == "POST" and action == "preupload" and len(rest) >= 2:
            user = self._user(headers, required=True)
            repo = self._get_repo(repo_type, repo_id, user, write=True)
            return self._preupload(repo, rest[1], query, body)
        if method == "POST" and action == "commit" and len(rest) >= 2:
            user = self._user(headers, required=True)
            repo = self._get_repo(repo_type, repo_id, user, write=True)
            return self._commit(repo, rest[1], query, body)
        if method == "POST" and action == "branch" and len(rest) >= 2:
            user = self._user(headers, required=True)
            repo = self._get_repo(repo_type, repo_id, user, write=True)
            branch = "/".join(rest[1:])
            if branch in repo.branches:
                raise HttpError(409, f"Branch {branch} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = self._revision(repo, start).oid
            return self._json(200, {})
        if action in ("xet-write-token", "xet-read-token"):
            raise HttpError(501, "The local test Hub does not implement Xet storage: set HF_HUB_DISABLE_XET=1 "
                                 "(the hub_server fixture does) or build HubServer(lfs=False).")
        raise HttpError(404, f"Route not served by the local test Hub: {method} api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        card, config = {}, {}
        if "README.md" in commit.files:
            block = _front_matter(self._content(commit.files["README.md"]).decode(errors="replace"))
            try:
                card = (yaml.safe_load(block) if block else None) or {}
            except yaml.YAMLError:
                card = {}
        if "config.json" in commit.files:
            try:
                full = json.loads(self._content(commit.files["config.json"]))
                config = {k: full[k] for k in ("architectures", "model_type", "auto_map", "custom_pipelines") if k in full}
            except ValueError:
                config = {}
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        if card.get("library_name"):
            tags.insert(0, card["library_name"])
        if isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs_sha256:
                    sibling["lfs"] = {"sha256": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "cardData": card or None,
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info.update(modelId=repo.repo_id, config=config or None,
                        pipeline_tag=card.get("pipeline_tag"), library_name=card.get("library_name"))
            if card.get("model-index") is not None:
                info["model-index"] = card["model-index"]
        return info

    def _file_json(self, repo: Repo, entry: FileEntry, expand: bool) -> dict:
        item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": entry.path}
        if entry.lfs_sha256:
            item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            item["lastCommit"] = self._last_commit(repo, entry.path)
        return item

    def _dir_json(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        inside = sorted((p, commit.files[p].oid) for p in commit.files if p.startswith(path + "/"))
        item = {"type": "directory", "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            item["lastCommit"] = self._last_commit(repo, path + "/")
        return item

    def _last_commit(self, repo: Repo, path: str) -> dict:
        # Latest commit on main whose change touched `path` (a file, or a folder when it ends with "/").
        def view(c: Commit | None):
            if c is None:
                return {}
            return {p: e.oid for p, e in c.files.items() if p == path or (path.endswith("/") and p.startswith(path))}

        commit = repo.commits[repo.branches["main"]]
        while commit.parent is not None and view(commit) == view(repo.commits[commit.parent]):
            commit = repo.commits[commit.parent]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def _tree(self, repo, commit, path, recursive, expand) -> list[dict]:
        prefix = path + "/" if path else ""
        if path and path in commit.files:
            raise HttpError(400, f"{path} is a file, not a folder")
        children_files = [p for p in commit.files if p.startswith(prefix)]
        if path and not children_files:
            raise HttpError(404, f"Folder {path} does not exist", code="EntryNotFound")
        dirs: set[str] = set()
        files: list[str] = []
        for p in children_files:
            rel = p[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(p)
        out = [self._dir_json(repo, commit, d, expand) for d in sorted(dirs)]
        out += [self._file_json(repo, commit.files[p], expand) for p in sorted(files)]
        return out

    def _paths_info(self, repo, commit, paths, expand) -> list[dict]:
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_json(repo, commit.files[path], expand))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(self._dir_json(repo, commit, path, expand))
        return out

    def _preupload(self, repo, revision, query, body):
        commit = self._revision(repo, "main" if query.get("create_pr") else revision)
        payload = json.loads(body or b"{}")
        patterns = self._gitattributes_lfs_patterns(commit)
        ignore = [line.strip() for line in (payload.get("gitIgnore") or "").splitlines()
                  if line.strip() and not line.startswith("#")]
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self._is_lfs(path, size, sample, patterns)
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if (lfs and existing.lfs_sha256) else (None if lfs else existing.oid)
            should_ignore = any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in ignore)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": should_ignore, "oid": oid})
        return self._json(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, repo, revision, query, body):
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "The first line of the commit payload must be the header")
        header = lines[0]["value"]
        if create_pr:
            if revision != "main":
                raise HttpError(400, "Pull requests can only target main on the local test Hub")
            repo.pr_count += 1
            branch = f"refs/pr/{repo.pr_count}"
            repo.branches[branch] = repo.branches["main"]
        else:
            branch = revision
            if branch not in repo.branches:
                code = None if re.fullmatch(r"[0-9a-f]{40}", branch) else "RevisionNotFound"
                raise HttpError(400 if code is None else 404, f"Cannot commit to {branch!r}: not a branch", code=code)
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent and parent != head.oid:
            raise HttpError(412, f"A commit has happened since {parent}. Please refresh and try again.")
        # Build the new tree entirely before touching the repo so a failure leaves the branch as it was.
        files = dict(head.files)
        new_blobs: dict[str, bytes] = {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", "")).lstrip("/")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HttpError(400, f"Unsupported encoding for {path}")
                data = base64.b64decode(value["content"])
                oid = git_blob_oid(data)
                new_blobs[oid] = data
                files[path] = FileEntry(path=path, size=len(data), oid=oid)
            elif key == "lfsFile":
                sha256 = value.get("oid")
                if sha256 not in repo.lfs_objects:
                    raise HttpError(422, f"LFS object {sha256} for {path} was never uploaded to this repo")
                files[path] = self._lfs_entry(path, sha256, len(self.lfs_store[sha256]))
            elif key == "deletedFile":
                if path not in files:
                    raise HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not doomed:
                    raise HttpError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HttpError(400, f"Unknown commit operation {key!r}")
        if self.fail_commit_status is not None:
            raise HttpError(self.fail_commit_status, "Injected failure: the commit was not applied")
        self.blobs.update(new_blobs)
        commit = self._new_commit(repo, head.oid, header.get("summary", ""), header.get("description", ""), files)
        repo.branches[branch] = commit.oid
        base = f"{self.url}/{PREFIXES[repo.repo_type]}{repo.repo_id}"
        return self._json(200, {
            "success": True, "commitOid": commit.oid, "commitUrl": f"{base}/commit/{commit.oid}", "hookOutput": "",
            "pullRequestUrl": f"{base}/discussions/{repo.pr_count}" if create_pr else None,
        })

    def _lfs(self, method, repo_type, repo_id, rest, query, headers, body):
        lfs_headers = {"Content-Type": "application/vnd.git-lfs+json"}
        if method == "POST" and rest == ["batch"]:
            user = self._user(headers, required=True)
            repo = self._get_repo(repo_type, repo_id, user, write=True)
            payload = json.loads(body or b"{}")
            if payload.get("operation") != "upload":
                raise HttpError(400, "Only LFS uploads are served (downloads go through /resolve)")
            base = f"{self.url}/{PREFIXES[repo_type]}{repo_id}.git/info/lfs/objects"
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                item = {"oid": oid, "size": size, "authenticated": True}
                if oid not in repo.lfs_objects:
                    ticket = secrets.token_urlsafe(16)
                    self._upload_tickets[ticket] = (f"{repo_type}:{repo_id}", oid, size)
                    item["actions"] = {
                        "upload": {"href": f"{base}/upload/{oid}?ticket={ticket}", "header": {}},
                        "verify": {"href": f"{base}/verify", "header": {}},
                    }
                objects.append(item)
            return self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, lfs_headers)
        if method == "PUT" and len(rest) == 2 and rest[0] == "upload":
            # Like a presigned storage URL: the ticket authorises the upload, not the Authorization header.
            ticket = query.get("ticket", [""])[0]
            expected = self._upload_tickets.pop(ticket, None)
            if expected is None or expected[0] != f"{repo_type}:{repo_id}" or expected[1] != rest[1]:
                raise HttpError(403, "Invalid or used upload ticket")
            _, oid, size = expected
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise HttpError(400, f"Uploaded content does not match oid {oid} / size {size}")
            self.lfs_store[oid] = body
            self.repos[(repo_type, repo_id)].lfs_objects.add(oid)
            return 200, {"Content-Type": "text/plain", "ETag": f'"{oid}"'}, b""
        if method == "POST" and rest == ["verify"]:
            user = self._user(headers, required=True)
            repo = self._get_repo(repo_type, repo_id, user, write=True)
            payload = json.loads(body or b"{}")
            if payload.get("oid") not in repo.lfs_objects or len(self.lfs_store[payload["oid"]]) != payload.get("size"):
                raise HttpError(404, f"LFS object {payload.get('oid')} not found")
            return self._json(200, {"success": True}, lfs_headers)
        raise HttpError(404, "Unknown LFS route")

    def _resolve(self, method, repo_type, repo_id, revision, path, headers):
        user = self._user(headers, required=False)
        repo = self._get_repo(repo_type, repo_id, user)
        commit = self._revision(repo, revision)
        entry = commit.files.get(path)
        base_headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry is None:
            raise HttpError(404, f"Entry not found: {path}", code="EntryNotFound", headers=base_headers)
        data = self._content(entry)
        out = {**base_headers, "Content-Type": "application/octet-stream"}
        if entry.lfs_sha256:
            # The Hub reports LFS files by their sha256; the client uses it as the cache key.
            out.update({"ETag": f'"{entry.lfs_sha256}"', "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                        "X-Linked-Size": str(entry.size)})
        else:
            out["ETag"] = f'"{entry.oid}"'
        status = 200
        range_header = headers.get("Range") or headers.get("range")
        if range_header and method == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match is None:
                raise HttpError(416, f"Unsupported range {range_header}")
            start_s, end_s = match.groups()
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else len(data) - 1
            else:
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise HttpError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        return status, out, data


def _model_index_errors(model_index) -> list[str]:
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ['"model-index" must be a list']
    errors = []
    for i, model in enumerate(model_index):
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(model.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            if not isinstance(dataset.get("type"), str) or not isinstance(dataset.get("name"), str):
                errors.append(f'"{where}.dataset" needs "type" and "name"')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
    return errors


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # bound by HubServer.start
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response carries Content-Length

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        try:
            status, headers, payload = self.hub.handle(method, self.path, self.headers, body)
        except Exception as exc:  # a server bug must surface as a 500 the test can see, not a hung client
            status, headers, payload = 500, {"Content-Type": "application/json"}, json.dumps({"error": f"local hub crashed: {exc!r}"}).encode()
        self.hub.requests.append((method, self.path, status))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def log_message(self, format, *args):  # requests are recorded in hub.requests instead of stderr
        pass


__all__ = ["HubServer", "DEFAULT_TOKEN", "DEFAULT_USER", "git_blob_oid"]
