"""Key files: small TOML files (kind, kid, base64 raw key); secret ones must be mode 0600.

Every key or trust file (public ones too) must be beyond the reach of other local users: a swapped
``signing.pub`` lets its author push allow-lists, a swapped ``backend-hpke.pub`` lets them read
every event. So the file and every directory above it must be owned by root or the service user
and writable by nobody else (``check_trusted_file``). Format specified in ``docs/privacy.md``
("Key files").
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import struct
import tomllib
from pathlib import Path
from typing import Any, Final

from drivers.errors import PermanentError

__all__ = [
    "KID_PATTERN",
    "KeyFileError",
    "check_trusted_file",
    "read_key_file",
    "read_key_table",
    "read_key_toml",
    "read_private_file",
    "write_key_file",
    "write_key_text",
]

MAX_KEY_FILE_BYTES: Final = 4096
# O_NONBLOCK: a FIFO planted as a key file must not hang the start (it is refused as not regular).
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
KID_PATTERN: Final = r"[a-z0-9][a-z0-9_-]{0,15}"
_KID_RE: Final = re.compile(KID_PATTERN)
_KIND_RE: Final = re.compile(r"[a-z0-9-]{1,32}")
# Linux POSIX ACL xattr layout (linux/posix_acl_xattr.h): u32 version, then (u16 tag, u16 perm,
# u32 id) entries, little-endian.
_ACL_VERSION: Final = 2
_ACL_USER: Final = 0x02
_ACL_GROUP_OBJ: Final = 0x04
_ACL_GROUP: Final = 0x08
_ACL_MASK: Final = 0x10
_ACL_OTHER: Final = 0x20


class KeyFileError(PermanentError):
    """A key file is missing, malformed or too open; the message says how to fix it."""


def read_key_file(path: Path, kind: str, *, secret: bool, length: int = 32) -> tuple[str, bytes]:
    """Return ``(kid, raw key)`` from a key file of ``kind``; secret files must be 0600."""
    kid, key, _ = read_key_table(path, kind, secret=secret, length=length)
    return kid, key


def read_key_table(
    path: Path, kind: str, *, secret: bool, length: int = 32
) -> tuple[str, bytes, dict[str, Any]]:
    """``(kid, raw key, the whole TOML table)``: for key files that carry parameters too."""
    data = read_key_toml(path, kind, secret=secret)
    kid = data.get("kid")
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise KeyFileError(f"{path}: kid must match {KID_PATTERN}")
    value = data.get("key")
    if not isinstance(value, str):
        raise KeyFileError(f"{path}: key must be a base64 string")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: key is not valid base64") from None
    if len(key) != length:
        raise KeyFileError(f"{path}: key must be {length} bytes, found {len(key)}")
    return kid, key, data


def read_key_toml(path: Path, kind: str, *, secret: bool) -> dict[str, Any]:
    """The TOML table of a key file of ``kind`` (permissions checked as ``read_key_table``)."""
    text = read_private_file(path) if secret else _read_public_file(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        # The decoder quotes the offending line, which may be key material: never repeat it.
        raise KeyFileError(f"{path}: not a valid TOML key file") from None
    if data.get("kind") != kind:
        raise KeyFileError(f"{path}: expected kind = {kind!r}, found {data.get('kind')!r}")
    return data


def write_key_text(path: Path, text: str, *, secret: bool) -> None:
    """Write a whole key file's text atomically (0600 if ``secret``, else 0644)."""
    _write_atomic(path, text.encode("utf-8"), 0o600 if secret else 0o644)


def write_key_file(
    path: Path, kind: str, kid: str, key: bytes, *, secret: bool, extra: str = ""
) -> None:
    """Write a key file atomically; secret files get mode 0600, public ones 0644.

    ``extra`` is TOML appended after the key (parameters that belong to the key).
    """
    if _KIND_RE.fullmatch(kind) is None:
        raise ValueError(f"bad key file kind {kind!r}")
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise ValueError(f"kid must match {KID_PATTERN}, got {kid!r}")
    note = "Secret: keep mode 0600." if secret else "Public key: safe to distribute."
    text = (
        f"# cabinet-agent {kind}. {note}\n"
        f'kind = "{kind}"\n'
        f'kid = "{kid}"\n'
        f'key = "{base64.b64encode(key).decode("ascii")}"\n'
        f"{extra}"
    )
    _write_atomic(path, text.encode("utf-8"), 0o600 if secret else 0o644)


def read_private_file(path: Path) -> str:
    """Read a secret file, refusing it if group or others may read or write it."""
    return _read(path, check_private=True)


def _read_public_file(path: Path) -> str:
    return _read(path, check_private=False)


def check_trusted_file(path: Path, *, secret: bool = False) -> None:
    """Refuse a key, certificate or CA file that anyone but root or this user could change.

    Raises KeyFileError (one line naming the file and the fix) when the file is missing, not a
    regular file, or it or a directory above it can be written by someone else; with
    ``secret=True`` also when anyone else may read it.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: file not found") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot open: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if secret:
            _check_private(fd, path, stat.S_IMODE(st.st_mode))
        _check_not_writable_by_others(fd, path, st)
    finally:
        os.close(fd)


def _trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _check_not_writable_by_others(fd: int, path: Path, st: os.stat_result) -> None:
    """The file and every directory above it: owned by root or us, writable by nobody else."""
    owners = _trusted_owners()
    if st.st_uid not in owners:
        raise KeyFileError(
            f"{path}: owned by uid {st.st_uid}, who could replace its contents; "
            f"fix it with: chown root {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    acl = _access_acl(fd)
    # With an access ACL the group bits are the ACL mask: the entries say who may write.
    if mode & (0o002 if acl is not None else 0o022):
        raise KeyFileError(
            f"{path}: mode is {mode:04o}, writable by group/others; fix it with: chmod go-w {path}"
        )
    writers = _acl_writers(acl)
    if writers:
        raise KeyFileError(
            f"{path}: ACL lets {', '.join(writers)} write it; fix it with: setfacl -b {path}"
        )
    # A writable directory anywhere above lets its writers rename the file away and plant
    # their own. World-writable sticky directories (/tmp) only let owners rename their entries,
    # and the entry below is checked to be ours (as OpenSSH's StrictModes, plus the sticky bit).
    directory = Path(os.path.realpath(path)).parent
    while True:
        try:
            dst = os.stat(directory)
        except OSError as err:
            raise KeyFileError(
                f"{path}: cannot check directory {directory}: {err.strerror}"
            ) from None
        if dst.st_uid not in owners:
            raise KeyFileError(
                f"{path}: directory {directory} is owned by uid {dst.st_uid}, who could replace "
                f"the file; fix it with: chown root {directory}"
            )
        dmode = stat.S_IMODE(dst.st_mode)
        if dmode & 0o022 and not dmode & stat.S_ISVTX:
            raise KeyFileError(
                f"{path}: directory {directory} is writable by group/others, who could replace "
                f"the file; fix it with: chmod go-w {directory}"
            )
        if directory.parent == directory:
            return
        directory = directory.parent


def _read(path: Path, *, check_private: bool) -> str:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot open key file: {err.strerror}") from None
    try:
        # fstat of the open descriptor: the mode checked is that of the bytes read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: key file is not a regular file")
        if check_private:  # first: its advice (chmod 600) also cures a writable file
            _check_private(fd, path, stat.S_IMODE(st.st_mode))
        _check_not_writable_by_others(fd, path, st)
        raw = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: key file larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: key file is not UTF-8 text") from None


def _check_private(fd: int, path: Path, mode: int) -> None:
    """Refuse a secret file that anyone but its owner (or this process's user) may use."""
    if not mode & 0o077:
        return
    acl = _access_acl(fd)
    if acl is None:
        raise KeyFileError(
            f"{path}: key file mode is {mode:04o}, readable or writable by group/others; "
            f"fix it with: chmod 600 {path}"
        )
    # With an access ACL the group bits are the ACL mask. systemd's LoadCredential= writes
    # credentials root-owned 0400 plus "user:<service user>:r": that grants only us, so accept it.
    leaks = _acl_leaks(acl, os.geteuid())
    if leaks:
        raise KeyFileError(
            f"{path}: key file ACL grants access to {', '.join(leaks)}; "
            f"fix it with: setfacl -b {path} && chmod 600 {path}"
        )


def _access_acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The file's POSIX access ACL entries (tag, perm, id), or None if it has none."""
    try:
        raw = os.getxattr(fd, "system.posix_acl_access")
    except OSError:
        return None  # no ACL, or a filesystem without ACL support
    if len(raw) < 4 or (len(raw) - 4) % 8 or int.from_bytes(raw[:4], "little") != _ACL_VERSION:
        return [(_ACL_OTHER, 0o7, 0)]  # unparseable: treat as open to others, refuse
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]


def _acl_writers(entries: list[tuple[int, int, int]] | None) -> list[str]:
    """Who besides root and this user may write, by the access ACL (empty without one)."""
    if entries is None:
        return []
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    owners = _trusted_owners()
    out = []
    for tag, perm, ident in entries:
        if tag == _ACL_OTHER and perm & 0o2:
            out.append("others")
        elif tag == _ACL_GROUP_OBJ and perm & mask & 0o2:
            out.append("the owning group")
        elif tag == _ACL_GROUP and perm & mask & 0o2:
            out.append(f"group {ident}")
        elif tag == _ACL_USER and perm & mask & 0o2 and ident not in owners:
            out.append(f"user {ident}")
    return out


def _acl_leaks(entries: list[tuple[int, int, int]], me: int) -> list[str]:
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    leaks = []
    for tag, perm, ident in entries:
        if tag == _ACL_OTHER and perm:
            leaks.append("others")
        elif tag == _ACL_GROUP_OBJ and perm & mask:
            leaks.append("the owning group")
        elif tag == _ACL_GROUP and perm & mask:
            leaks.append(f"group {ident}")
        elif tag == _ACL_USER and perm & mask and ident != me:
            leaks.append(f"user {ident}")
    return leaks


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            # O_CREAT applies the umask and keeps the mode of a leftover file: set it explicitly.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
