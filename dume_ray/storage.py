"""A run folder on object storage (`storage: s3://bucket/prefix`): the storage is the run's source of truth,
and every node keeps a node-local working copy of it under `<runs_dir>/<name>/`.

    store = RunStorage.for_run(cfg.storage, cfg.name, cfg.run_dir)   # s3://, gs://, file:// or a plain path
    store.check_format()     # ConfigError when the stored run was made by an incompatible version
    store.check_writable()   # ConfigError naming the URI when it cannot be reached or written (before any work)
    store.pull()             # storage -> local: finished stages' outputs and manifests (the driver, at start)
    store.push()             # local -> storage: data files first, manifests (DONE.json) last (after each stage)
    store.ensure_local(path) # on a node that is not the driver's: fetch this model / folder before reading it
    store.fetch(path)        # on any node: what another node wrote (a finished job's model, a checkpoint)

What goes where: the driver pulls the stored run before it decides what to skip, so `manifest.is_done` sees
the storage's truth (a local manifest the storage lacks is removed, and that stage reruns); it pushes after
every stage and before it launches jobs, so the workers can fetch what it made. A worker on another node
fetches the inputs it reads (`ensure_local`, called by `model.load_model` / `load_tokenizer`) and pushes what
it saves (`push_path`). Ray Train checkpoints go straight to storage (`ray_train_storage`), and are not synced.
Objects are written whole and renamed into place (on file systems) or put in one request (object stores), and
a stage's DONE.json is uploaded after all its files, so a half-uploaded stage never looks finished. No locks:
two writers of one path write the same content, the last one wins.

Workers learn the storage from two environment variables the driver sets for its Ray job (`worker_env`); with
none set every function here does nothing, and local runs work as before.

Credentials and endpoints come from the usual places (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL for an S3-compatible store such as MinIO or moto; GOOGLE_APPLICATION_CREDENTIALS for gs://),
or from the URI's query (`s3://bucket/prefix?endpoint_override=http://host:9000&scheme=http`).

Pure: pyarrow.fs only, no Ray. Tested in tests/unit/test_storage.py (local file system and a moto S3 server).
"""

from __future__ import annotations

import io
import json
import os
import socket
import uuid
from typing import BinaryIO, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dume_ray.config import ConfigError

FORMAT_VERSION = 1  # the run folder's layout; bump when a stage's outputs or manifests change incompatibly
FORMAT_FILE = "FORMAT.json"
MANIFEST = "DONE.json"
NOT_SYNCED = ("ray_train", "logs")  # Ray Train writes its checkpoints to storage itself; logs are per node
ENV_STORAGE, ENV_RUN_DIR, ENV_DRIVER_HOST = "DUME_RAY_STORAGE", "DUME_RAY_RUN_DIR", "DUME_RAY_DRIVER_HOST"
ENV_RUN_AS_GIVEN = "DUME_RAY_RUN_DIR_AS_GIVEN"  # the config's `<runs_dir>/<name>`, when relative
CHUNK = 1 << 24  # bytes per read while streaming a file to or from storage
STATE_FILE = ".storage-state.json"  # per node: what each file was when last synced (not synced itself)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path on it) for a storage URI or a plain path. For s3:// an S3-compatible endpoint comes
    from the URI's `endpoint_override=` or from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    parsed = urlparse(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    try:
        if parsed.scheme == "s3" and endpoint and "endpoint_override" not in parsed.query:
            scheme = urlparse(endpoint).scheme or "https"
            fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme,
                                   region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
            return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
        fs, path = pafs.FileSystem.from_uri(uri if parsed.scheme else os.path.abspath(uri))
        return fs, path.rstrip("/")
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"storage={uri!r}: cannot open it ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def _synced(rel: str) -> bool:
    """Whether a run-relative path travels between storage and nodes: not Ray Train's checkpoints, not the
    per-node logs, not a temp name (`.x.tmp-...`, `x.tmp-123`) of an atomic write in progress."""
    parts = rel.split("/")
    return not (parts[0] in NOT_SYNCED or "ray_train" in parts or any(p.startswith(".") or ".tmp-" in p for p in parts))


class RunStorage:
    """One run's folder on storage (`<storage>/<name>`) and its node-local working copy (`local_dir`)."""

    def __init__(self, uri: str, local_dir: str, fs: Optional[pafs.FileSystem] = None, root: Optional[str] = None):
        self.uri, self.local_dir = uri.rstrip("/"), os.path.abspath(local_dir)
        self.as_given = os.path.normpath(local_dir)  # how the config's paths name the run folder
        self.driver_dir = self.local_dir  # the driver's working copy: the absolute paths it hands out are in it
        self.fs, self.root = (fs, root) if fs is not None else resolve(self.uri)

    @classmethod
    def for_run(cls, storage: str, name: str, local_dir: str) -> "RunStorage":
        return cls(_join(storage.split("?")[0], name) + (f"?{storage.split('?', 1)[1]}" if "?" in storage else ""),
                   local_dir)

    @classmethod
    def from_env(cls) -> Optional["RunStorage"]:
        """The storage the driver set for this Ray job's workers; None when the run has none."""
        uri, driver_dir = os.environ.get(ENV_STORAGE), os.environ.get(ENV_RUN_DIR)
        if not (uri and driver_dir):
            return None
        as_given = os.path.normpath(os.environ.get(ENV_RUN_AS_GIVEN) or driver_dir)
        # This node's working copy: `<runs_dir>/<name>` from this process's working directory when the config
        # names it relatively (a `ray job submit` unpacks the job's working directory on every node), else
        # the driver's absolute path, on this node's disk.
        store = cls(uri, as_given if not os.path.isabs(as_given) else driver_dir)
        store.as_given, store.driver_dir = as_given, driver_dir
        return store

    def worker_env(self) -> dict[str, str]:
        """What the driver puts in its Ray job's env_vars so the workers find the storage and the local copy."""
        return {ENV_STORAGE: self.uri, ENV_RUN_DIR: self.driver_dir, ENV_RUN_AS_GIVEN: self.as_given,
                ENV_DRIVER_HOST: socket.gethostname()}

    # ---- checks before any work ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write, read back and delete a probe object; ConfigError naming the URI when any of it fails."""
        probe = _join(self.root, f".probe-{uuid.uuid4().hex}")
        try:
            self._put(probe, io.BytesIO(b"dume_ray storage probe"))
            with self.fs.open_input_stream(probe) as f:
                f.read()
            self.fs.delete_file(probe)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"storage={self.uri!r}: cannot write there ({_short(exc)}); check the URI, the "
                              f"bucket, the credentials and the endpoint (AWS_ENDPOINT_URL)") from None

    def check_format(self) -> bool:
        """ConfigError when the stored run folder holds a run of another layout version, or holds objects but
        no FORMAT.json (not a run folder of ours); an empty or new folder is fine. True when a run is there."""
        path = _join(self.root, FORMAT_FILE)
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                if self._list(limit_one=True):
                    raise ConfigError(f"storage {self.uri}: holds files but no {FORMAT_FILE}, so it is not a dume_ray "
                                      f"run folder (this version writes format_version {FORMAT_VERSION}); use another "
                                      f"name or storage prefix")
                return False
            with self.fs.open_input_stream(path) as f:
                found = json.loads(f.read().decode()).get("format_version")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"storage={self.uri!r}: cannot read it ({_short(exc)}); check the URI, the bucket, the "
                              f"credentials and the endpoint (AWS_ENDPOINT_URL)") from None
        check_version(found, f"{self.uri}/{FORMAT_FILE}")
        return True

    # ---- sync -----------------------------------------------------------------------------------------------
    def pull(self, sub: str = "") -> int:
        """Make the local copy of `sub` (run-relative; "" = the whole run) match storage; manifests last, and a
        local manifest the storage lacks is removed (that stage is not finished as far as the run knows).
        Returns the number of files fetched."""
        remote = {rel: info for rel, info in self._list(sub).items() if _synced(rel)}
        order = sorted(remote, key=lambda rel: (rel.endswith(MANIFEST), rel))
        fetched, state = 0, self._state()
        for rel in order:
            local = os.path.join(self.local_dir, rel)
            if not _in_sync(state.get(rel), remote[rel], local):
                self._download(remote[rel], local)
                state[rel] = _entry(remote[rel], local)
                fetched += 1
        self._save_state(state)
        for local in _local_files(os.path.join(self.local_dir, sub) if sub else self.local_dir):
            rel = os.path.relpath(local, self.local_dir).replace(os.sep, "/")
            if rel.endswith(MANIFEST) and _synced(rel) and rel not in remote:
                os.remove(local)
        return fetched

    def push(self, sub: str = "") -> int:
        """Upload what differs under `sub` (run-relative; "" = the whole run): data files first, then manifests
        from the deepest up, so storage never holds a manifest whose files are missing. Returns the count."""
        start = os.path.join(self.local_dir, sub) if sub else self.local_dir
        if not os.path.exists(start):
            return 0
        remote = self._list(sub if os.path.isdir(start) else os.path.dirname(sub))
        rels = [os.path.relpath(p, self.local_dir).replace(os.sep, "/") for p in _local_files(start)]
        # FORMAT.json first (a run folder half uploaded is still ours), DONE.json last, deepest first
        rels = sorted((r for r in rels if _synced(r)), key=lambda r: (r != FORMAT_FILE, r.endswith(MANIFEST), -r.count("/"), r))
        sent, state = 0, self._state()
        for rel in rels:
            local = os.path.join(self.local_dir, rel)
            if rel in remote and _in_sync(state.get(rel), remote[rel], local):
                continue
            with open(local, "rb") as f:
                self._put(_join(self.root, rel), f)
            state[rel] = _entry(self.fs.get_file_info(_join(self.root, rel)), local)
            sent += 1
        self._save_state(state)
        return sent

    def record_format(self) -> None:
        """Record the layout version, locally and on storage (at every start; the same content each time)."""
        path = os.path.join(self.local_dir, FORMAT_FILE)
        write_format(self.local_dir)
        with open(path, "rb") as f:
            self._put(_join(self.root, FORMAT_FILE), f)

    # ---- one path, on a worker ------------------------------------------------------------------------------
    def relative(self, path: str) -> Optional[str]:
        """`path` relative to the run folder (as stored), or None when it lies outside the run. A relative path
        is read as the config wrote it (`runs/<name>/...`), whatever this process's working directory."""
        norm = os.path.normpath(path)
        if not os.path.isabs(norm) and (norm == self.as_given or norm.startswith(self.as_given + os.sep)):
            return _rel(os.path.relpath(norm, self.as_given))
        for base in (self.local_dir, self.driver_dir):  # this node's copy, or a path the driver handed out
            rel = os.path.relpath(os.path.abspath(norm), base)
            if not rel.startswith(".."):
                return _rel(rel)
        return None

    def remote_path(self, path: str) -> str:
        """The path on `self.fs` of a local path inside the run folder (for Ray Data's `filesystem=`)."""
        rel = self.relative(path)
        if rel is None:
            raise ValueError(f"{path} is not inside the run folder {self.local_dir}")
        return _join(self.root, rel)

    def on_driver_node(self) -> bool:
        """Whether this process shares the driver's working copy: same host and the same folder."""
        return (os.environ.get(ENV_DRIVER_HOST, socket.gethostname()) == socket.gethostname()
                and self.local_dir == self.driver_dir)

    def ensure_local(self, path: str) -> str:
        """Before a worker reads `path` (a model folder, a shard folder): on a node other than the driver's,
        fetch what differs from storage, and return where the local copy is. On the driver's node the local
        copy is the newest and is kept (`path` is returned as it is)."""
        rel = self.relative(path)
        if not rel or self.on_driver_node():
            return path
        self.pull(rel)
        return os.path.join(self.local_dir, rel)

    def fetch(self, path: str) -> str:
        """Make the local copy of `path` (inside the run) match storage on any node, the driver's included, and
        return where it is: for what another node wrote (a finished job's model, a local-mode checkpoint)."""
        rel = self.relative(path)
        if not rel:
            return path
        self.pull(rel)
        return os.path.join(self.local_dir, rel)

    def ray_train_storage(self, storage_path: str) -> tuple[str, pafs.FileSystem]:
        """(storage_path, storage_filesystem) for a Ray Train RunConfig whose local `storage_path` lies in the
        run folder: the same place on storage, so a job resumed on any node finds its checkpoints."""
        return self.remote_path(storage_path), self.fs

    def push_path(self, path: str) -> None:
        """After a worker saved `path` inside the run folder: upload it (the driver may be on another node)."""
        rel = self.relative(path)
        if rel:
            self.push(rel)

    def remove(self, path: str) -> None:
        """After `path` (a folder inside the run) was deleted locally: delete it on storage too, so no node
        downloads it again (a continued student's parent weights, once the new model is in place)."""
        rel = self.relative(path)
        if not rel:
            return
        remote = _join(self.root, rel)
        if self.fs.get_file_info(remote).type != pafs.FileType.NotFound:
            self.fs.delete_dir(remote)
        state = self._state()
        self._save_state({k: v for k, v in state.items() if k != rel and not k.startswith(rel + "/")})

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        """{run-relative path: [local size, local mtime_ns, stored size, stored mtime]} at the last transfer."""
        try:
            with open(os.path.join(self.local_dir, STATE_FILE)) as f:
                state = json.load(f)
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: every file is compared afresh (transferred once more)

    def _save_state(self, state: dict) -> None:
        from dume_ray.manifest import write_json_atomic
        if state:  # another process may save at once: the last one wins, the other's files transfer again later
            write_json_atomic(os.path.join(self.local_dir, STATE_FILE), state)

    def _list(self, sub: str = "", limit_one: bool = False) -> dict[str, pafs.FileInfo]:
        base = _join(self.root, sub) if sub else self.root
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return {sub: info}
        if info.type == pafs.FileType.NotFound:
            return {}
        found = {}
        for item in self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
            if item.type == pafs.FileType.File:
                found[item.path[len(self.root):].strip("/")] = item
                if limit_one:
                    break
        return found

    def _put(self, path: str, source: BinaryIO) -> None:
        """One object, whole, streamed from `source`: an upload on an object store (the object appears when it
        completes); a temp name renamed into place on a file system."""
        parent = path.rsplit("/", 1)[0]
        local = isinstance(self.fs, pafs.LocalFileSystem)
        if local:
            self.fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}" if local else path
        with self.fs.open_output_stream(tmp) as f:
            while chunk := source.read(CHUNK):
                f.write(chunk)
        if local:
            self.fs.move(tmp, path)

    def _download(self, info: pafs.FileInfo, local: str) -> None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        os.replace(tmp, local)


def _rel(rel: str) -> str:
    rel = rel.replace(os.sep, "/")
    return "" if rel == "." else rel


def _local_files(start: str) -> list[str]:
    if os.path.isfile(start):
        return [start]
    return [os.path.join(d, f) for d, _, files in os.walk(start) for f in files]


def _entry(info: pafs.FileInfo, local: str) -> list:
    stat = os.stat(local)
    return [stat.st_size, stat.st_mtime_ns, info.size, info.mtime.timestamp() if info.mtime is not None else None]


def _in_sync(entry: Optional[list], info: pafs.FileInfo, local: str) -> bool:
    """Neither the local file nor the stored object changed since they were last transferred by this node.
    A local change is seen to the nanosecond; a stored object by its size and time, which object stores keep to
    the second (an object rewritten with the same size within the second this node fetched it is missed)."""
    try:
        return entry is not None and entry[3] is not None and _entry(info, local) == entry
    except FileNotFoundError:
        return False


def write_format(run_dir: str) -> None:
    """`<run_dir>/FORMAT.json`: the layout version this code writes."""
    from dume_ray.manifest import write_json_atomic
    write_json_atomic(os.path.join(run_dir, FORMAT_FILE), {"format_version": FORMAT_VERSION})


def check_local_format(run_dir: str) -> None:
    """ConfigError when a local run folder records another layout version. A folder from before versions were
    recorded (no FORMAT.json) has this layout (version 1) and is accepted."""
    path = os.path.join(run_dir, FORMAT_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            found = json.load(f).get("format_version")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable ({_short(exc)}); it records the run folder's format_version") from None
    check_version(found, path)


def check_version(found, where: str) -> None:
    if found != FORMAT_VERSION:
        raise ConfigError(f"{where}: the run folder has format_version {found!r}, this dume_ray reads and writes "
                          f"{FORMAT_VERSION}; use a new run name (or storage prefix), or the dume_ray that made it")


def active() -> Optional[RunStorage]:
    """The run's storage in a worker process (from the environment), cached per process; None without one."""
    global _ACTIVE
    key = (os.environ.get(ENV_STORAGE), os.environ.get(ENV_RUN_DIR))
    if _ACTIVE is None or _ACTIVE[0] != key:
        _ACTIVE = (key, RunStorage.from_env())
    return _ACTIVE[1]


_ACTIVE: Optional[tuple] = None


def is_uri(path: str) -> bool:
    """Whether `path` names a place on storage (`s3://...`, `gs://...`, `file://...`) rather than a local path."""
    return "://" in path


def read_text(uri: str, rel: str) -> Optional[str]:
    """The text of `<uri>/<rel>` on storage, read with pyarrow.fs; None when there is no such file, ConfigError
    naming the URI when the storage cannot be read."""
    fs, root = resolve(uri)
    path = _join(root, rel)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{uri}: cannot read {rel} there ({_short(exc)}); check the URI, the bucket, the "
                          f"credentials and the endpoint (AWS_ENDPOINT_URL)") from None


def ensure_local(path: str) -> str:
    """`RunStorage.ensure_local` for the run's storage, if any; returns the path to read."""
    store = active()
    return store.ensure_local(path) if store is not None else path


def fetch(path: str) -> str:
    """`RunStorage.fetch` for the run's storage, if any; returns the path to read."""
    store = active()
    return store.fetch(path) if store is not None else path


def push_path(path: str) -> None:
    """`RunStorage.push_path` for the run's storage, if any (no-op otherwise)."""
    store = active()
    if store is not None:
        store.push_path(path)


def remove_path(path: str) -> None:
    """`RunStorage.remove` for the run's storage, if any (no-op otherwise)."""
    store = active()
    if store is not None:
        store.remove(path)
