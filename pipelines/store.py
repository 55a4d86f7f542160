"""Artifact and run storage on a local path or any pyarrow.fs URI (``s3://``, ``gs://``, ``file://``).

Layout under the storage root::

    artifacts/<component>/<cache_key>/      a published artifact: its files + manifest.json
    artifacts/.tmp/<cache_key>-<nonce>/     an artifact being written (never read)
    scratch/<cache_key>/                    what a stage keeps between attempts (checkpoints)
    runs/<run_id>/run.json                  the run record
    runs/<run_id>/pipeline.yaml             the resolved pipeline the run executes

Publishing is atomic: on a local path the finished directory is renamed into place; on an
object store the files are uploaded first and ``manifest.json`` last, and a directory without
a manifest is not an artifact. Every read of a cached artifact checks each file's size and
sha256 against the manifest, so a deleted or tampered file is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pipelines.guards import (
    InputError,
    TooLarge,
    one_line,
    read_bounded,
    redact,
    remember_secrets,
    storage_problem,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs


# pyarrow (most of a second to import) is needed for URI stores only: a run on local storage
# that finds every stage cached never loads it.
def _pafs():
    import pyarrow.fs

    return pyarrow.fs


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a storage call raises: an ``OSError``, or one of pyarrow's own errors. (Called in
    ``except`` clauses, so only once something was raised.)"""
    import pyarrow

    return (pyarrow.ArrowException, OSError)


MANIFEST = "manifest.json"
CHUNK = 1 << 20
#: Files that record when and how fast a stage ran, not what it made (its progress points carry
#: their time). They are checksummed and verified like every file but left out of the content
#: digest, so a stage recomputed to the same bytes keeps its digest and its dependents' keys.
VOLATILE_FILES = frozenset({"history.jsonl"})


def sha256_file(path: Path) -> str:
    """Returns the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data gives equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest_of(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def list_files(root: Path) -> dict[str, dict[str, Any]]:
    """Lists every regular file under ``root`` with its size and sha256, by relative path."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"artifact file {path} is a symbolic link; artifacts hold plain files")
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def files_digest(files: dict[str, dict[str, Any]], volatile: bool = False) -> str:
    """The content digest of an artifact: sha256 over its sorted (path, sha256) pairs.

    Args:
        volatile: include the ``VOLATILE_FILES`` too (a digest of every byte, not of content).
    """
    return digest_of(
        sorted(
            (rel, meta["sha256"])
            for rel, meta in files.items()
            if volatile or rel not in VOLATILE_FILES
        )
    )


def atomic_write_text(path: Path, text: str | bytes, durable: bool = True) -> None:
    """Writes a local file (text as UTF-8, or bytes) through a temporary name and a rename.

    Args:
        durable: fsync before the rename, so the file survives a power cut, not only a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; records and manifests are for every reader
        with os.fdopen(fd, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactInvalid(Exception):
    """A stored artifact failed verification; the message says which file and why."""


class StorageError(InputError):
    """A storage root that cannot be used: an unknown scheme, an empty name, a location that
    cannot be listed, read or written (a file, a read-only folder, an endpoint that does not
    answer); the message names the root, credentials redacted."""


def _reason(error: BaseException) -> str:
    """Why a storage call failed, in a few words: the OS's reason, else the library's line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return one_line(error, 300)


def stays_inside(rel: str) -> bool:
    """Whether a manifest's file name stays inside its artifact (no absolute path, no ``..``)."""
    parts = PurePosixPath(rel)
    return bool(rel) and not parts.is_absolute() and ".." not in parts.parts


def check_files(local: Path, manifest: dict[str, Any]) -> None:
    """Checks every file the manifest lists: present, right size, right sha256.

    Raises:
        ArtifactInvalid: naming the first file that is not.
    """
    for rel, meta in manifest.get("files", {}).items():
        if not stays_inside(rel):
            raise ArtifactInvalid(f"file {rel} leaves the artifact's directory")
        path = local / rel
        if not path.is_file():
            raise ArtifactInvalid(f"file {rel} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactInvalid(f"file {rel} has {size} bytes, expected {meta['bytes']}")
        if sha256_file(path) != meta["sha256"]:
            raise ArtifactInvalid(f"file {rel} does not match its sha256")


@dataclass(frozen=True)
class Store:
    """Storage for one pipeline: artifacts, scratch space and run records.

    Args:
        uri: a local path (relative paths are taken from the current directory) or a
            pyarrow.fs URI such as ``s3://bucket/prefix`` or ``file:///abs/path``.
    """

    uri: str

    def __post_init__(self) -> None:
        problem = storage_problem(self.uri)
        if problem:
            raise StorageError(repr(self.uri), None, problem)
        remember_secrets(self.uri)  # hidden wherever a library repeats them

    # --- where things live -------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    @functools.cached_property  # asked for on every path; resolving it walks the disk
    def root(self) -> str:
        """The storage root: an absolute local path, or the URI as given."""
        return str(Path(self.uri).expanduser().resolve()) if self.is_local else self.uri.rstrip("/")

    @property
    def shown_root(self) -> str:
        """The root as it may be shown or saved: a URI's credentials redacted."""
        return redact(self.root)

    def shown(self, *parts: str) -> str:
        """A path or URI under the root as it may be shown or saved (see :meth:`join`)."""
        return redact(self.join(*parts))

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem and base path of the root.

        Raises:
            StorageError: pyarrow cannot open the URI (unknown scheme, bad options...).
        """
        if self.is_local:
            return _pafs().LocalFileSystem(), self.root
        try:
            return _pafs().FileSystem.from_uri(self.uri)
        except (*_storage_errors(), ValueError) as e:
            raise StorageError(self.shown_root, None, f"cannot open: {one_line(e)}") from None

    def check_writable(self) -> None:
        """Writes and removes a probe file under ``runs/`` (making the folders), so a root
        that cannot be written fails here, before a run writes anything.

        Raises:
            StorageError: a regular file in the way, a read-only folder, an endpoint that does
                not answer (after the filesystem's own retries).
        """
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.is_local:
                runs = Path(self.root) / "runs"
                runs.mkdir(parents=True, exist_ok=True)
                (runs / probe).write_bytes(b"")
                (runs / probe).unlink()
                return
            fs, base = self._fs()
            if fs.type_name in ("local", "hdfs"):  # object stores have no folders to make
                fs.create_dir(f"{base}/runs", recursive=True)
            with fs.open_output_stream(f"{base}/runs/{probe}") as f:
                f.write(b"")
            fs.delete_file(f"{base}/runs/{probe}")
        except _storage_errors() as e:
            raise StorageError(self.shown_root, None, f"cannot write here: {_reason(e)}") from None

    def join(self, *parts: str) -> str:
        """A path or URI under the root; each part must stay inside it. A URI's query
        (``?endpoint_override=...``) stays at its end."""
        for part in parts:
            p = PurePosixPath(part)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"storage path {part!r} would leave the storage root")
        if self.is_local:
            return "/".join([self.root, *parts])
        base, sep, query = self.root.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query

    def artifact_rel(self, component: str, key: str) -> str:
        """``artifacts/<component>/<key>``; each part a single name (never ``..`` or ``a/b``)."""
        for part in (component, key):
            if not part or "/" in part or "\\" in part or part in (".", ".."):
                raise ValueError(f"artifact path part {part!r} is not a single name")
        return f"artifacts/{component}/{key}"

    def scratch(self, key: str) -> str:
        """The scratch location of a stage config (a local path or a URI; made on first use)."""
        return self.join("scratch", key)

    def drop_scratch(self, key: str) -> None:
        if self.is_local:
            shutil.rmtree(self.scratch(key), ignore_errors=True)
            return
        fs, base = self._fs()
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_dir(f"{base}/scratch/{key}")

    def local_cache_dir(self) -> Path:
        """Where artifacts from a remote store are downloaded to on this node."""
        return Path(os.environ.get("RAYPIPE_CACHE", Path.home() / ".cache" / "raypipe"))

    # --- artifacts ---------------------------------------------------------------------

    def new_output_dir(self, key: str) -> Path:
        """A fresh local directory for a stage to write its artifact into."""
        nonce = uuid.uuid4().hex[:8]
        if self.is_local:
            base = Path(self.root) / "artifacts" / ".tmp"
        else:
            base = self.local_cache_dir() / ".tmp"
        path = base / f"{key}-{nonce}"
        path.mkdir(parents=True)
        return path

    def publish(self, out_dir: Path, component: str, key: str, manifest: dict[str, Any]) -> dict:
        """Publishes a finished output directory as the artifact for ``key``.

        Checksums every file, writes ``manifest.json`` (with ``files`` and ``digest``), then
        moves the directory into place atomically. If a valid artifact for ``key`` already
        exists (an identical stage finished first), that one is kept and returned.

        Returns:
            The manifest of the published artifact.
        """
        files = list_files(out_dir)
        files.pop(MANIFEST, None)
        manifest = {**manifest, "files": files, "digest": files_digest(files)}
        where = self.join(self.artifact_rel(component, key))
        manifest["path"] = redact(where)  # a record of where it is, not a credential
        # No fsync: an artifact is trusted only after its files pass their sha256 (verify), so
        # even a power cut that tore a file is caught and the stage recomputed.
        text = json.dumps(manifest, indent=1, sort_keys=True)
        atomic_write_text(out_dir / MANIFEST, text, durable=False)
        if self.is_local:
            final = Path(where)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(out_dir, final)
            except OSError:
                # The name is taken: keep a valid existing artifact, replace an invalid one.
                try:
                    existing = self.verify(component, key)
                    shutil.rmtree(out_dir, ignore_errors=True)
                    return existing
                except ArtifactInvalid:
                    self.discard(component, key)
                    os.rename(out_dir, final)
        else:
            fs, base = self._fs()
            dest = f"{base}/{self.artifact_rel(component, key)}"
            # Every folder first (a file:// store, like a local disk, has folders; on an object
            # store these are empty markers), then the files, the manifest last: it marks the
            # artifact whole.
            for folder in sorted({str(PurePosixPath(rel).parent) for rel in files} | {"."}):
                fs.create_dir(dest if folder == "." else f"{dest}/{folder}", recursive=True)
            for rel in files:
                _pafs().copy_files(str(out_dir / rel), f"{dest}/{rel}", destination_filesystem=fs)
            _pafs().copy_files(
                str(out_dir / MANIFEST), f"{dest}/{MANIFEST}", destination_filesystem=fs
            )
            shutil.rmtree(out_dir, ignore_errors=True)
        return manifest

    def read_manifest(self, component: str, key: str) -> dict[str, Any] | None:
        """Returns the manifest of a published artifact, or None if there is none."""
        rel = f"{self.artifact_rel(component, key)}/{MANIFEST}"
        try:
            if self.is_local:
                return json.loads(Path(self.root, rel).read_bytes())
            fs, base = self._fs()
            with fs.open_input_stream(f"{base}/{rel}") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def verify(self, component: str, key: str) -> dict[str, Any]:
        """Checks a published artifact file by file against its manifest.

        Returns:
            The manifest, when every listed file exists with its size and sha256.

        Raises:
            ArtifactInvalid: missing manifest or file, wrong size or checksum.
        """
        manifest = self.read_manifest(component, key)
        if manifest is None:
            raise ArtifactInvalid("no manifest.json")
        local = self.local_artifact_dir(component, key, manifest)
        try:
            check_files(local, manifest)
        except ArtifactInvalid:
            if self.is_local:
                raise
            # A torn or stale download on this node: fetch once more before calling it broken.
            shutil.rmtree(local, ignore_errors=True)
            check_files(self.local_artifact_dir(component, key, manifest), manifest)
        return manifest

    def local_artifact_dir(self, component: str, key: str, manifest: dict[str, Any]) -> Path:
        """A local directory holding the artifact's files (downloaded from a remote store).

        Downloads are kept per content digest, so two stores' artifacts of the same key never
        share a local copy.
        """
        if self.is_local:
            return Path(self.root) / self.artifact_rel(component, key)
        every_byte = files_digest(manifest.get("files", {}), volatile=True)
        local = self.local_cache_dir() / component / key / every_byte[:16]
        fs, base = self._fs()
        src = f"{base}/{self.artifact_rel(component, key)}"
        for rel, meta in manifest.get("files", {}).items():
            if not stays_inside(rel):
                continue  # never written outside the cache; verify() rejects the manifest
            path = local / rel
            if path.is_file() and path.stat().st_size == meta["bytes"]:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                _pafs().copy_files(f"{src}/{rel}", str(part), source_filesystem=fs)
                os.replace(part, path)  # never a half-downloaded file under the real name
            except (FileNotFoundError, OSError):
                part.unlink(missing_ok=True)
                continue  # verify() reports the missing file
        return local

    def local_artifact(self, path: str) -> Path | None:
        """A run record's artifact path as a folder on this machine, or None when it is not
        one inside this store's ``artifacts/`` (a record cannot point readers elsewhere)."""
        if not self.is_local:
            return None
        try:
            found = Path(path).resolve()
        except (OSError, ValueError, RuntimeError):
            return None
        inside = found.is_relative_to(Path(self.root, "artifacts"))  # the root is resolved
        return found if inside and found.is_dir() else None

    def discard(self, component: str, key: str) -> None:
        """Removes a (broken) published artifact so it can be produced again."""
        if self.is_local:
            path = Path(self.root) / self.artifact_rel(component, key)
            if path.exists():
                trash = path.parent.parent / ".tmp" / f"discarded-{key}-{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(path, trash)  # out of the way first, atomically; then deleted
                shutil.rmtree(trash, ignore_errors=True)
            return
        fs, base = self._fs()
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_dir(f"{base}/{self.artifact_rel(component, key)}")

    # --- run records -------------------------------------------------------------------

    def run_dir(self, run_id: str) -> str:
        return self.join("runs", run_id)

    def write_run_file(self, run_id: str, name: str, text: str | bytes) -> None:
        """Writes a file of a run's directory (text as UTF-8, or bytes; atomically on a
        local path)."""
        if self.is_local:
            # The record is not what makes a stage complete (its artifact is): no fsync.
            atomic_write_text(Path(self.run_dir(run_id)) / name, text, durable=False)
            return
        fs, base = self._fs()
        fs.create_dir(f"{base}/runs/{run_id}", recursive=True)
        with fs.open_output_stream(f"{base}/runs/{run_id}/{name}") as f:
            f.write(text if isinstance(text, bytes) else text.encode())

    def read_run_file(
        self, run_id: str, name: str, limit: int = 32 << 20, binary: bool = False
    ) -> str | bytes | None:
        """A file of a run's directory (at most ``limit`` bytes), or None if there is none.

        Raises:
            ValueError: a run id that would leave the storage root.
            TooLarge: the file holds more than ``limit`` bytes.
            StorageError: it exists but cannot be read.
            UnicodeDecodeError: not UTF-8 (unless ``binary``).
        """
        where = self.join("runs", run_id, name)  # rejects ids that would leave the root
        try:
            if self.is_local:
                # Bounded, and never blocked: the file may be a FIFO or a device.
                data = read_bounded(where, limit)
            else:
                fs, base = self._fs()
                with fs.open_input_stream(f"{base}/runs/{run_id}/{name}") as f:
                    data = f.read(limit + 1)
                if len(data) > limit:
                    raise TooLarge(limit, None)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except _storage_errors() as e:
            raise StorageError(
                self.shown("runs", run_id, name), None, f"cannot read: {_reason(e)}"
            ) from None
        return data if binary else data.decode()

    def run_ids(self) -> list[str]:
        """Every run id in the store, oldest first (ids start with a timestamp).

        Raises:
            StorageError: the storage cannot be listed (not a folder, an endpoint that does
                not answer...).
        """
        fs, base = self._fs()
        try:
            infos = fs.get_file_info(_pafs().FileSelector(f"{base}/runs", allow_not_found=True))
        except _storage_errors() as e:
            raise StorageError(self.shown_root, None, f"cannot list runs: {_reason(e)}") from None
        return sorted(i.base_name for i in infos if i.type == _pafs().FileType.Directory)


# --- the driver lock of a run ----------------------------------------------------------------


class RunLocked(RuntimeError):
    """A run is being driven by another live process."""


@contextlib.contextmanager
def driver_lock(store: Store, run_id: str):
    """Holds ``runs/<run_id>/driver.lock`` while a driver runs, so ``resume`` cannot start a
    second driver of a live run. It is an ``flock``: the kernel drops it when the process
    dies, even by SIGKILL, so a dead driver never leaves a stale lock. (Local storage only:
    object stores have no such lock.)"""
    if not store.is_local:
        yield
        return
    path = Path(store.run_dir(run_id)) / "driver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLocked(
                f"run {run_id} is still running ({holder}); not starting a second driver"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
