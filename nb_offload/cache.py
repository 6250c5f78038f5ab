"""The offload cache: converted unit bytes on disk, private to the user and checked before use.

A disk-tier unit whose checkpoint bytes can't be read as they are (another dtype, experts fused
by transformers' conversions) is written here once and read from here on every step. The folder
is untrusted input, like the checkpoint:

- **Private.** ``<disk>/nb_offload-<fingerprint>/`` and any folder created on the way are 0700.
  An existing ``disk`` folder owned by another user, or writable by its group or others, is
  refused, as is a cache folder that is a link. Files are created with ``O_EXCL|O_NOFOLLOW``
  under a random temporary name and renamed into place once complete; links are never followed.
- **Keyed.** The fingerprint covers the checkpoint files' names, sizes, inodes, and modification
  and change times (a write changes the change time, and no call can set it back, so contents
  changed with their mtime restored still give a new key), the dtype, the quantization and the
  unit layout.
- **Self-verifying.** Each file starts with a 4 KiB header holding the unit's name, size,
  fingerprint and the SHA-256 of its bytes. A file reused by a load is read and hashed before
  the load uses it (in parallel, at the drive's speed); one that fails is rewritten from the
  checkpoint, with a warning. Like git's index, ``verified.json`` keeps each file's inode, size,
  modification and change times as they were when it was last hashed or written: a file whose
  figures still match is not hashed again (any write changes its change time, which no call can
  set back), so reloading an unchanged cache costs no read. Steps read without hashing.
- **Shared safely.** A load holds a shared lock on the folder while its model is loaded. A failed
  load removes its temporary files always, and what it wrote only when no other process holds
  the folder, so an interrupted load never pulls files from under another process.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from .budget import disk_free, format_size
from .errors import DiskTierError

CACHE_FORMAT = 2
STAMPS = "verified.json"     # unit -> the file's (inode, size, mtime_ns, ctime_ns) when last checked
STAMPS_LIMIT = 16 * 2**20
HEADER = 4096            # header bytes before the unit's; keeps the bytes block-aligned for O_DIRECT
MAGIC = b"NBOFFLOAD\n"
READ = 16 * 2**20        # bytes per read while verifying


def describe_owner(st) -> str:
    try:
        import pwd
        return pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        return f"uid {st.st_uid}"


def check_private(path: str, st, what: str):
    """Refuse a folder another user owns or others may write: files planted there would be used."""
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise DiskTierError(
            f"{what} {path!r} belongs to {describe_owner(st)} (mode {stat.S_IMODE(st.st_mode):04o}), not to you; "
            "files planted there would be loaded as weights. Give a folder of your own, e.g. \"./offload\".")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DiskTierError(
            f"{what} {path!r} (owner {describe_owner(st)}) can be written by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); files planted there would be loaded as weights. Run "
            f"chmod go-w {path!r}, or give a folder only you can write.")


def make_private_dir(path: str) -> list[str]:
    """Create ``path`` (and missing parents) readable by this user only, or check that the
    existing folder is private enough; return the folders created."""
    created = []
    probe = os.path.abspath(path)
    todo = []
    while not os.path.isdir(probe):
        if os.path.lexists(probe):
            raise DiskTierError(f"disk={path!r} can't be used: {probe!r} is a file, not a folder; "
                                "give a folder path that can be created.")
        todo.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for d in reversed(todo):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            remove_empty(created)
            raise DiskTierError(f"disk={path!r} can't be created ({exc.strerror}: {d!r}); "
                                "give a folder you can write.") from exc
        created.append(d)
    check_private(os.path.abspath(path), os.stat(path), "disk folder")
    if not os.access(path, os.W_OK | os.X_OK):
        remove_empty(created)
        raise DiskTierError(f"disk={path!r} is not writable by this user; give a folder you can write.")
    return created


def remove_empty(folders):
    """Remove these folders, innermost first, where empty (a folder another process filled stays)."""
    for d in reversed(folders):
        try:
            os.rmdir(d)
        except OSError:
            pass


class OffloadCache:
    """Unit files under ``<disk>/nb_offload-<fingerprint>/``, each written once and reused."""

    def __init__(self, root: str, fingerprint: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.fingerprint = fingerprint
        self.folder = os.path.join(self.root, f"nb_offload-{fingerprint}")
        self.verified: set[str] = set()     # unit names whose file passed its check (or was written here)
        self.verify_seconds = 0.0           # reading and hashing files at load
        self.verified_bytes = 0             # hashed at load
        self.stamped_bytes = 0              # unchanged since last hashed (verified.json): not read
        self._stamps: dict = {}             # what this process checked or wrote, for verified.json
        self._created: list[str] = []       # folders this process made
        self._written: list[str] = []       # unit files this process put in place
        self._lock_fd = None

    @staticmethod
    def fingerprint_of(checkpoint, dtype, quant, units) -> str:
        layout = [[u.name, u.nbytes] for u in units]
        h = hashlib.sha256(json.dumps([CACHE_FORMAT, checkpoint.fingerprint_parts(), str(dtype), quant,
                                       layout]).encode())
        return h.hexdigest()[:24]

    # -- the folder ----------------------------------------------------------------------
    def prepare(self, units, *, threads: int = 4):
        """Make the folder ready for ``units`` (those to be cached): create or check it, hold it,
        verify the files already there, and check the drive has room for the rest. Nothing is
        created when ``units`` is empty."""
        units = [u for u in units if u.name not in self.verified]
        if not units:
            return
        if self._lock_fd is None:
            self._open_folder()
        self._verify_existing(units, threads)
        missing = sum(HEADER + u.nbytes for u in units if u.name not in self.verified)
        free = disk_free(self.folder)
        if missing > free:
            raise DiskTierError(
                f"disk={self.root!r} has {format_size(free)} free but the offload cache needs "
                f"{format_size(missing)} more; free space there or give another folder.")

    def _open_folder(self):
        self._created = make_private_dir(self.root)
        for _ in range(3):      # the folder may be removed by another process between the steps
            try:
                os.mkdir(self.folder, 0o700)
                self._created.append(self.folder)
            except FileExistsError:
                pass
            except OSError as exc:
                raise DiskTierError(f"disk={self.root!r}: the cache folder can't be created ({exc.strerror}).") from exc
            st = os.lstat(self.folder)
            if not stat.S_ISDIR(st.st_mode):
                raise DiskTierError(f"offload cache {self.folder!r} is not a folder (a link or a file was put "
                                    "there); remove it, or give another disk folder.")
            check_private(self.folder, st, "offload cache folder")
            try:
                fd = os.open(os.path.join(self.folder, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise DiskTierError(f"offload cache {self.folder!r}: its lock file can't be opened ({exc.strerror}); "
                                    "remove the folder, or give another disk folder.") from exc
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(os.path.join(self.folder, ".lock")))
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)        # removed while we waited for the lock: start over
        raise DiskTierError(f"offload cache {self.folder!r} keeps disappearing; is another process removing it?")

    def release(self):
        """Let go of the folder (the model was unloaded); its files stay for later loads."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard_new(self):
        """Undo a failed load: remove what this process wrote, unless another process holds the
        folder (its model may be reading those very files), and the folders it created, if empty."""
        if self._lock_fd is None:
            remove_empty(self._created)
            self._created = []
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:
            alone = False
        if alone:
            for path in self._written:
                _unlink(path)
            if self.folder in self._created and not [n for n in os.listdir(self.folder)
                                                     if n not in (".lock", STAMPS)]:
                _unlink(os.path.join(self.folder, STAMPS))
                _unlink(os.path.join(self.folder, ".lock"))
        self.release()
        if alone:
            remove_empty(self._created)
        self._created, self._written, self._stamps = [], [], {}

    # -- unit files ----------------------------------------------------------------------
    def path_for(self, unit) -> str:
        safe = unit.name.replace("/", "_").replace(os.sep, "_") or "root"
        return os.path.join(self.folder, f"{safe}.bin")

    def has(self, unit) -> bool:
        return unit.name in self.verified

    def extents(self, unit):
        return [(self.path_for(unit), HEADER, unit.nbytes, 0)]

    def _header(self, unit, digest: str) -> bytes:
        meta = json.dumps({"format": CACHE_FORMAT, "unit": unit.name, "nbytes": unit.nbytes,
                           "fingerprint": self.fingerprint, "sha256": digest}).encode()
        return (MAGIC + meta + b"\n").ljust(HEADER, b" ")

    def write(self, unit, flat):
        """Write a unit's flat bytes under a fresh temporary name (created exclusively, never
        through a link), then rename it into place. Any failure, an interrupt included, removes
        the temporary file."""
        view = memoryview(flat.numpy())
        header = self._header(unit, hashlib.sha256(view).hexdigest())
        path = self.path_for(unit)
        try:
            write_new(path, (header, view), sync=True)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskTierError(f"disk={self.root!r} is full: writing {unit.name!r} ({format_size(unit.nbytes)}) "
                                    "failed; free space there or give another folder.") from exc
            raise DiskTierError(f"disk={self.root!r}: writing {unit.name!r} failed ({exc.strerror}).") from exc
        self._written.append(path)
        self.verified.add(unit.name)
        self._stamp(unit)

    # -- stamps: files unchanged since they were last hashed -------------------------------
    @staticmethod
    def _figures(st) -> list:
        return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _stamp(self, unit):
        try:
            self._stamps[unit.name] = self._figures(os.lstat(self.path_for(unit)))
        except OSError:
            pass

    def _read_stamps(self) -> dict:
        """verified.json as a dict of unit -> figures; anything unexpected in it reads as empty (then
        every file is hashed: a damaged stamp file costs time, never trust)."""
        try:
            fd = os.open(os.path.join(self.folder, STAMPS), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > STAMPS_LIMIT:
                return {}
            data = json.loads(os.read(fd, STAMPS_LIMIT).decode())
        except (OSError, ValueError):
            return {}
        finally:
            os.close(fd)
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint \
                or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items()
                if isinstance(v, list) and len(v) == 4 and all(type(x) is int for x in v)}

    def save_stamps(self):
        """Merge what this process checked into verified.json (a fresh file renamed into place)."""
        if not self._stamps or self._lock_fd is None:
            return
        files = self._read_stamps()
        files.update(self._stamps)
        body = json.dumps({"fingerprint": self.fingerprint, "files": files}).encode()
        try:
            write_new(os.path.join(self.folder, STAMPS), (body,), sync=False)
        except OSError:         # only a speed-up is lost: the next load hashes again
            pass
        self._stamps = {}

    def _verify_existing(self, units, threads):
        present = [u for u in units if os.path.lexists(self.path_for(u))]
        if not present:
            return
        stamps = self._read_stamps()
        unchanged = []
        for u in present:
            try:
                st = os.lstat(self.path_for(u))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and stamps.get(u.name) == self._figures(st):
                unchanged.append(u)
        for u in unchanged:
            self.verified.add(u.name)
            self.stamped_bytes += u.nbytes
        present = [u for u in present if u.name not in self.verified]
        if not present:
            return
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(present))),
                                thread_name_prefix="nb_offload-verify") as pool:
            problems = list(pool.map(self._check_file, present))
        self.verify_seconds += time.perf_counter() - t0
        for unit, problem in zip(present, problems):
            if problem is None:
                self.verified.add(unit.name)
                self.verified_bytes += unit.nbytes
                self._stamp(unit)
                continue
            warnings.warn(f"nb_offload: offload cache file {self.path_for(unit)!r} failed its check ({problem}); "
                          "it is rewritten from the checkpoint.", RuntimeWarning, stacklevel=3)
            _unlink(self.path_for(unit))

    def _check_file(self, unit, *, hash_bytes=True):
        """None if the unit's file is what this load would write, else what is wrong with it.
        (``hash_bytes=False`` stops after the header: what the checks cost is measured against that.)"""
        path = self.path_for(unit)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            return "a link" if exc.errno == errno.ELOOP else exc.strerror
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file"
            if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
                return f"owned by {describe_owner(st)}"
            if st.st_size != HEADER + unit.nbytes:
                return f"{st.st_size} bytes where {HEADER + unit.nbytes} were written"
            head = os.pread(fd, HEADER, 0)
            try:
                meta = json.loads(head[len(MAGIC):].decode().strip()) if head.startswith(MAGIC) else None
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                return "no nb_offload header"
            if (meta.get("format"), meta.get("unit"), meta.get("nbytes"), meta.get("fingerprint")) != \
                    (CACHE_FORMAT, unit.name, unit.nbytes, self.fingerprint):
                return "its header is for another unit or checkpoint"
            if not hash_bytes:
                return None
            h = hashlib.sha256()
            buf = bytearray(min(READ, max(unit.nbytes, 1)))
            view = memoryview(buf)
            offset, end = HEADER, HEADER + unit.nbytes
            while offset < end:
                n = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
                if n <= 0:
                    return "shorter than its size"
                h.update(view[:n])
                offset += n
            if h.hexdigest() != meta.get("sha256"):
                return "its bytes don't match their SHA-256"
            return None
        finally:
            os.close(fd)


def write_new(path, parts, *, sync: bool):
    """Write ``parts`` (bytes-like) to a fresh temporary file beside ``path``, created exclusively and
    never through a link, then rename it into place (``sync``: on the drive first). Any failure, an
    interrupt included, removes the temporary file before it goes on."""
    tmp = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        for part in parts:
            part, done = memoryview(part), 0
            while done < len(part):
                done += os.write(fd, part[done:])
        if sync:
            os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        _unlink(tmp)
        raise


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass
