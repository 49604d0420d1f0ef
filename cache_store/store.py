"""A cache root as a zarr store: a local folder or an fsspec URL (``s3://``, ``gs://``, ``file://``).

Everything the cache writes goes through zarr's store layer, so the same code runs on a local
disk and on an object store. The few small objects of the commit protocol (progress records,
leases, the commit itself) are plain keys written with the store's ``set`` or with
:func:`create_if_absent`, the one atomic primitive the commit protocol needs.

Remote roots and their options
------------------------------
``cache.storage_options`` is passed to fsspec (for ``s3://``: ``s3fs.S3FileSystem``), e.g.
``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": "http://minio:9000"}}`` or
``{"endpoint_url": ...}`` or ``{"profile": "team"}``. Without them the usual environment is used:
botocore itself reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE`` and the
standard ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) variables, so nothing is mapped
here. For ``s3://`` a few defaults are added under the user's options: short connect timeouts
and few retries (a wrong endpoint fails in seconds, not minutes), no listing cache (another
process's commit must be seen at once) and no shared filesystem instance (credentials are read
afresh; ``ObjectStore`` shares one filesystem per root and environment within a process).
Opening a root checks it with one real request (a write probe when writing), so a
wrong endpoint, a missing bucket or bad credentials are one clear line before any work starts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import json
import os
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from cache_store.errors import CacheError

T = TypeVar("T")

# s3fs options added under the user's own (theirs win; ``config_kwargs`` is merged key by key)
S3_DEFAULTS: dict[str, Any] = {
    "skip_instance_cache": True,
    "use_listings_cache": False,
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 2, "mode": "standard"},
    },
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one of the store's coroutines on zarr's own event loop."""
    return sync(coro)


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def local_path(root: str) -> Path:
    return Path(root.removeprefix("file://")).expanduser()


def remote_options(root: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options for ``root``: the user's, over this module's defaults for ``s3://``."""
    opts = dict(storage_options or {})
    if root.split("://", 1)[0] in ("s3", "s3a"):
        config = {**S3_DEFAULTS["config_kwargs"], **opts.get("config_kwargs", {})}
        opts = {**S3_DEFAULTS, **opts, "config_kwargs": config}
    return opts


def open_root(root: str, storage_options: dict[str, Any] | None = None, *, write: bool) -> Store:
    """The store for a cache root; with ``write`` the root is created and checked writable.

    A remote root is checked with a real request (see ``check_remote``); its failures are one
    ``CacheError`` line naming the cause (endpoint, bucket, credentials).
    """
    if not is_remote(root):
        path = local_path(root)
        if write:
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / f".write-probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise CacheError(
                    f"cache root {path} is not writable ({e.strerror}); "
                    "choose another with --cache-root or cache.root"
                ) from None
        elif not path.is_dir():
            raise CacheError(f"cache root {path} does not exist")
        return LocalStore(path, read_only=not write)
    store = _remote_store(root, remote_options(root, storage_options), read_only=not write)
    with remote_errors(root):
        check_remote(store, write=write)
    return store


class ObjectStore(FsspecStore):
    """zarr's ``FsspecStore`` with two fixes for object stores, where each request costs a round trip.

    - ``exists`` of a key is one ``HEAD`` and ``get`` of a whole object one ``GET`` (s3fs adds
      a ``HEAD``, and on a missing key a listing to look for a "directory", which zarr keys
      never are);
    - ``set_if_not_exists`` (zarr calls it for every parent group of every new node) is one
      conditional PUT (``If-None-Match: *``) instead of zarr's racy exists-then-write.
    """

    async def exists(self, key: str) -> bool:
        if not hasattr(self.fs, "_call_s3"):
            return await super().exists(key)
        bucket, _, name = _fs_path(self, key).partition("/")
        try:
            await self.fs._call_s3("head_object", Bucket=bucket, Key=name)
        except FileNotFoundError:
            return False
        return True

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if byte_range is not None or not hasattr(self.fs, "_call_s3"):
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        try:
            data = await self.fs._cat_file(_fs_path(self, key), max_concurrency=1)
        except self.allowed_exceptions:
            return None
        except TypeError:  # an s3fs without ``max_concurrency``: its own (two-request) read
            return await super().get(key, prototype, byte_range)
        return prototype.buffer.from_bytes(data)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # zarr re-asserts every parent group of every node it creates: a key this store created
        # or found once is not asked for again (keys are only deleted with their whole cache)
        known: set[str] = self.__dict__.setdefault("_known", set())
        if key in known:
            return
        await _create(self, key, value.to_bytes())
        known.add(key)

    async def delete(self, key: str) -> None:
        self.__dict__.get("_known", set()).discard(key)
        await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        known: set[str] = self.__dict__.get("_known", set())
        for k in [k for k in known if k.startswith(prefix.rstrip("/") + "/")]:
            known.discard(k)
        await super().delete_dir(prefix)


# filesystems of remote roots, one per (root, options, AWS_* environment) in this process, so
# that a command's many opens share one connection pool; closed at exit
_FILESYSTEMS: dict[tuple[Any, ...], tuple[Any, str]] = {}


def _remote_store(root: str, opts: dict[str, Any], *, read_only: bool) -> ObjectStore:
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    token = (os.getpid(), root, json.dumps(opts, sort_keys=True, default=str), env)
    if token in _FILESYSTEMS:
        fs, path = _FILESYSTEMS[token]
        return ObjectStore(fs=fs, path=path, read_only=read_only)
    try:
        store = ObjectStore.from_url(root, storage_options=opts, read_only=read_only)
    except ImportError as e:
        raise CacheError(f"cache root {root} needs a package that is missing: {e}") from None
    except (TypeError, ValueError) as e:
        raise CacheError(f"cache root {root}: bad cache.storage_options ({one_line(e)})") from None
    if not _FILESYSTEMS:
        atexit.register(_close_filesystems)
    _FILESYSTEMS[token] = (store.fs, store.path)
    return store


def _close_filesystems() -> None:
    """Close the HTTP sessions of the remote filesystems (s3fs leaves async ones open)."""
    for token, (fs, _) in list(_FILESYSTEMS.items()):
        if token[0] != os.getpid():  # inherited through a fork: the parent's to close
            continue
        creator = getattr(fs, "_s3creator", None)
        if creator is not None and hasattr(creator, "__aexit__"):
            with contextlib.suppress(Exception):
                sync(creator.__aexit__(None, None, None), timeout=5)
    _FILESYSTEMS.clear()


# --- errors of remote stores -----------------------------------------------------------------


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def describe(e: BaseException) -> str:
    """``Type: first words of the message``, on one line (decode and metadata failures)."""
    return f"{type(e).__name__}: {one_line(e)[:120]}"


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def describe_remote_error(e: BaseException, root: str) -> str | None:
    """One line for a failure talking to an object store, or None when it is not one."""
    names = _names(e)
    code = ""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    bucket = root.split("://", 1)[-1].split("/", 1)[0]
    if "ParamValidationError" in names:
        return f"cache root {root} is not a valid object store URL ({one_line(e)})"
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
        return (
            f"no credentials for cache root {root} ({one_line(e)}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or key/secret in cache.storage_options"
        )
    if isinstance(e, PermissionError) or code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "403",
    ):
        return (
            f"access denied to cache root {root} ({one_line(e)}): check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or key/secret in "
            "cache.storage_options) and that they may read and write this bucket"
        )
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "FSTimeoutError",
    } or isinstance(e, ConnectionError | TimeoutError):
        return (
            f"cannot reach the object store of cache root {root} ({one_line(e)}): check the "
            "endpoint (endpoint_url in cache.storage_options, or AWS_ENDPOINT_URL) and the network"
        )
    if code == "NoSuchBucket" or (isinstance(e, FileNotFoundError) and "bucket" in str(e).lower()):
        return (
            f"bucket {bucket!r} of cache root {root} does not exist (or is not visible with these "
            "credentials): create it, or fix --cache-root / cache.root"
        )
    if isinstance(e, OSError) and e.errno == errno.EIO:  # s3fs: an error code it does not map
        return f"the object store of cache root {root} failed: {one_line(e)}"
    return None


@contextlib.contextmanager
def remote_errors(root: str) -> Iterator[None]:
    """Turn a failure of the object store behind ``root`` into one ``CacheError`` line."""
    try:
        yield
    except CacheError:
        raise
    except Exception as e:
        if not is_remote(root):
            raise
        message = describe_remote_error(e, root)
        if message is None:
            raise
        raise CacheError(message) from None


def _fs_path(store: FsspecStore, key: str) -> str:
    return f"{store.path.rstrip('/')}/{key}" if key else store.path.rstrip("/")


def check_remote(store: Store, *, write: bool) -> None:
    """One real request to the root: a listing when reading, a write probe when writing.

    The write probe is also a conditional create made twice: when the second one is not refused
    the server ignores ``If-None-Match`` and commits fall back to a read-back check (racy; see
    ``create_if_absent``).
    """
    if not isinstance(store, FsspecStore):
        return
    fs = store.fs
    if not write:
        bucket, _, prefix = store.path.partition("/")
        if hasattr(fs, "_call_s3"):  # one page of one key: bucket, credentials and endpoint
            run(fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1))
        else:
            with contextlib.suppress(FileNotFoundError):
                run(fs._ls(store.path))
        return
    probe = f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    create_if_absent(store, probe, b"")  # a failure here (endpoint, bucket, credentials) raises
    try:
        if create_if_absent(store, probe, b"again"):
            store.fs._lst_no_conditional = True  # noted on the filesystem object
    finally:
        with contextlib.suppress(Exception):
            run(fs._rm_file(_fs_path(store, probe)))


# --- objects -----------------------------------------------------------------------------------


def get_bytes(store: Store, key: str) -> bytes | None:
    buf = run(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def get_json(store: Store, key: str) -> Any | None:
    """A progress or lease record; a torn one reads as absent. Not for commits: a damaged
    commit is not an absent one (``cache_store.reader.read_commit``)."""
    raw = get_bytes(store, key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None  # a torn write of a progress record counts as absent


def set_bytes(store: Store, key: str, data: bytes) -> None:
    run(store.set(key, cpu.Buffer.from_bytes(data)))


def set_json(store: Store, key: str, value: Any) -> None:
    set_bytes(store, key, json.dumps(value, indent=1).encode())


def _no_conditional(store: FsspecStore) -> bool:
    return bool(getattr(store.fs, "_lst_no_conditional", False))


def conditional_create_supported(store: Store) -> bool:
    """Whether ``create_if_absent`` is atomic on this store (checked by ``check_remote``)."""
    if isinstance(store, LocalStore):
        return True
    return isinstance(store, FsspecStore) and not _no_conditional(store)


def create_if_absent(store: Store, key: str, data: bytes) -> bool:
    """Create ``key`` only if it does not exist; True when this call created it.

    The atomic primitive of the commit protocol:

    - local roots: the bytes go to a temporary file in the same folder which is then hard-linked
      to the key (``link`` fails if the name exists): exclusive and never torn;
    - object stores: a conditional PUT (``If-None-Match: *``, S3 since 2024-08, honoured by moto
      and MinIO), through s3fs' ``pipe_file(..., mode="create")``: the server refuses the second
      of two racing creates with 412, which s3fs raises as ``FileExistsError``;
    - a filesystem without a conditional create: exists-then-write, then a read-back decides
      (two writers racing within one round trip may both believe they won).
    """
    if isinstance(store, LocalStore):
        path = Path(store.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True
    if isinstance(store, FsspecStore):
        return run(_create(store, key, data))
    if exists(store, key):
        return False
    set_bytes(store, key, data)
    return get_bytes(store, key) == data


async def _create(store: FsspecStore, key: str, data: bytes) -> bool:
    """``create_if_absent`` on an fsspec filesystem, on zarr's event loop."""
    store._check_writable()
    path = _fs_path(store, key)
    try:
        await store.fs._pipe_file(path, data, mode="create")
        if not _no_conditional(store):
            return True
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError, ValueError):  # no exclusive create here
        if await store.exists(key):
            return False
        await store.fs._pipe_file(path, data)
    got = await store.get(key, prototype=default_buffer_prototype())
    return got is not None and got.to_bytes() == data


def set_json_if_absent(store: Store, key: str, value: Any) -> bool:
    """Write ``key`` only if nobody has; True when this call's value is the one stored."""
    return create_if_absent(store, key, json.dumps(value, indent=1).encode())


def exists(store: Store, key: str) -> bool:
    return run(store.exists(key))


def list_dir(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    return sorted(run(collect()))


def list_prefix(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sorted(run(collect()))


def list_sizes(store: Store, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` (a folder, ending in ``/``) with its size in bytes.

    One listing on an object store (sizes come with it), a walk on a local root.
    """
    if isinstance(store, LocalStore):
        base = Path(store.root) / prefix
        if not base.is_dir():
            return {}
        out = {}
        for dirpath, _, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                out[str(p.relative_to(store.root))] = p.stat().st_size
        return out
    if isinstance(store, FsspecStore):
        root = store.path.rstrip("/") + "/"
        try:
            found = run(store.fs._find(_fs_path(store, prefix.rstrip("/")), detail=True))
        except FileNotFoundError:
            return {}
        return {
            name.removeprefix(root): int(info.get("size") or 0)
            for name, info in found.items()
            if info.get("type", "file") != "directory"
        }

    async def collect() -> dict[str, int]:
        return {k: await store.getsize(k) async for k in store.list_prefix(prefix)}

    return run(collect())


def delete(store: Store, key: str) -> None:
    run(store.delete(key))


def delete_dir(store: Store, prefix: str) -> None:
    run(store.delete_dir(prefix))


def size_of(store: Store, prefix: str) -> int:
    return sum(list_sizes(store, prefix.rstrip("/") + "/").values())


def copy_objects(
    src: Store,
    dst: Store,
    pairs: dict[str, str],
    *,
    on_copied: Callable[[str, int], None] | None = None,
    concurrency: int = 8,
) -> None:
    """Copy object ``src_key`` of ``src`` to ``dst_key`` of ``dst`` for each pair, byte for byte.

    ``concurrency`` copies at a time on zarr's event loop, started in the order given;
    ``on_copied(dst_key, n_bytes)`` after each. After a failure no new copy starts, those under
    way finish (what is copied stays for a resume), and the first error is raised.
    """
    proto = default_buffer_prototype()

    async def copy_all() -> None:
        sem = asyncio.Semaphore(concurrency)
        failed: list[BaseException] = []

        async def one(src_key: str, dst_key: str) -> None:
            async with sem:
                if failed:  # after a failure nothing new starts; what is under way finishes
                    return
                try:
                    buf = await src.get(src_key, prototype=proto)
                    if buf is None:
                        raise CacheError(
                            f"object {src_key} disappeared from the source during the copy"
                        )
                    await dst.set(dst_key, buf)
                except BaseException as e:
                    failed.append(e)
                    return
            if on_copied is not None:
                on_copied(dst_key, len(buf))

        await asyncio.gather(*(one(a, b) for a, b in pairs.items()))
        if failed:
            raise failed[0]

    run(copy_all())


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
