"""A site key held in a TPM 2.0: the cabinet's half of p3 pseudonyms (docs/privacy.md §5).

The TPM holds an HMAC-SHA256 key (the site key's p3 purpose key, derived and kept by the
backend) as an object nothing can export, under a storage key the TPM re-creates from its owner
seed at every start; the disk holds only the object's TPM-wrapped blob, which no other TPM can
load. Enrolment is offline duplication (TPM2_Import): the cabinet hands out its storage key's
public part (``storage_parent``), the backend wraps the HMAC key to it in software
(``wrap_hmac_key``), the cabinet imports the result (``import_duplicate``) and writes the blob.
``TpmHmacKey`` computes HMACs with the loaded object.

tpm2-pytss (``pip install 'cabinet-agent[tpm]'``, over the TSS2 libraries of the distribution)
is imported only here and only when a TPM is used: without it the agent runs p1/p2 site keys
and refuses a TPM key file with that reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

from agent.privacy.tcti import DEFAULT_TCTI, TCTI_PATTERN, check_tcti
from drivers.errors import CabinetError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TCTI",
    "MAX_BLOB",
    "TCTI_PATTERN",
    "TpmDuplicate",
    "TpmError",
    "TpmHmacKey",
    "TpmKeyBlob",
    "check_tcti",
    "import_duplicate",
    "parent_name",
    "storage_parent",
    "wrap_hmac_key",
]

HMAC_KEY_LEN: Final = 32
# A second caller waits this long for a TPM command still running in another thread; the
# kernel's TPM driver bounds each command (its own timeouts: seconds, not minutes).
_LOCK_TIMEOUT_S: Final = 10.0
MAX_BLOB: Final = 1024


class TpmError(CabinetError):
    """The TPM cannot do what was asked; the message is one line saying why (never key bytes)."""


@dataclass(frozen=True, slots=True)
class TpmKeyBlob:
    """What the disk holds of a TPM-held key: useless without the TPM that wrapped it.

    ``parent`` is the name of the storage key the object is wrapped under (it identifies the
    TPM and its owner seed); ``public`` / ``private`` are the marshalled TPM2B_PUBLIC and
    TPM2B_PRIVATE that TPM2_Load takes.
    """

    parent: bytes
    public: bytes
    private: bytes

    def to_toml(self) -> str:
        return (
            "\n[tpm]\n"
            f'parent = "{self.parent.hex()}"\n'
            f'public = "{_b64(self.public)}"\n'
            f'private = "{_b64(self.private)}"\n'
        )

    @classmethod
    def from_table(cls, table: object) -> TpmKeyBlob:
        """From the ``[tpm]`` table of a TPM key file; ValueError names the field."""
        fields = _table(table, ("parent", "public", "private"))
        return cls(_hex(fields, "parent"), _blob(fields, "public"), _blob(fields, "private"))


@dataclass(frozen=True, slots=True)
class TpmDuplicate:
    """An HMAC key wrapped (offline duplication) for one TPM's storage key: the backend makes
    it, ``import_duplicate`` turns it into a ``TpmKeyBlob`` on that TPM and only there."""

    parent: bytes
    public: bytes
    duplicate: bytes
    seed: bytes

    def to_toml(self) -> str:
        return (
            "\n[tpm]\n"
            f'parent = "{self.parent.hex()}"\n'
            f'public = "{_b64(self.public)}"\n'
            f'duplicate = "{_b64(self.duplicate)}"\n'
            f'seed = "{_b64(self.seed)}"\n'
        )

    @classmethod
    def from_table(cls, table: object) -> TpmDuplicate:
        fields = _table(table, ("parent", "public", "duplicate", "seed"))
        return cls(
            _hex(fields, "parent"),
            _blob(fields, "public"),
            _blob(fields, "duplicate"),
            _blob(fields, "seed"),
        )


def storage_parent(tcti: str) -> bytes:
    """The marshalled TPM2B_PUBLIC of this TPM's storage key: what the backend wraps to."""
    tpm = _bindings()
    esapi = _open(tpm, tcti)
    try:
        handle, public = _create_parent(tpm, esapi)
        esapi.flush_context(handle)
        return bytes(public.marshal())
    except tpm.TSS2_Exception as err:
        raise TpmError(_describe(tpm, err)) from None
    finally:
        esapi.close()


def parent_name(parent_public: bytes) -> bytes:
    """The TPM name of a storage key's public part (what a key blob records as its parent)."""
    tpm = _bindings()
    public = _unmarshal(tpm, tpm.TPM2B_PUBLIC, parent_public, "storage key public part")
    _check_parent_public(tpm, public.publicArea)
    return bytes(public.get_name().marshal())


def wrap_hmac_key(parent_public: bytes, key: bytes) -> TpmDuplicate:
    """Wrap ``key`` as a non-exportable HMAC-SHA256 object for the TPM whose storage key is
    ``parent_public``: computed in software (the backend), imported only by that TPM."""
    if len(key) != HMAC_KEY_LEN:
        raise ValueError(f"the HMAC key must be {HMAC_KEY_LEN} bytes")
    tpm = _bindings()
    from tpm2_pytss.utils import wrap

    parent = _unmarshal(tpm, tpm.TPM2B_PUBLIC, parent_public, "storage key public part")
    _check_parent_public(tpm, parent.publicArea)
    public = _hmac_public(tpm)
    seed = secrets.token_bytes(32)
    sensitive = tpm.TPM2B_SENSITIVE(tpm.TPMT_SENSITIVE(sensitiveType=tpm.TPM2_ALG.KEYEDHASH))
    sensitive.sensitiveArea.seedValue = tpm.TPM2B_DIGEST(seed)
    sensitive.sensitiveArea.sensitive.bits = tpm.TPM2B_SENSITIVE_DATA(key)
    # A keyed-hash object's unique field commits to its key: H(seedValue || key).
    public.publicArea.unique.keyedHash = tpm.TPM2B_DIGEST(hashlib.sha256(seed + key).digest())
    # Outer wrapper only (symmetric seed to the parent's ECC key, HMAC + AES-CFB): no inner
    # wrapper key to carry alongside.
    _, duplicate, sym_seed = wrap(parent.publicArea, public, sensitive)
    return TpmDuplicate(
        parent=bytes(parent.get_name().marshal()),
        public=bytes(public.marshal()),
        duplicate=bytes(duplicate.marshal()),
        seed=bytes(sym_seed.marshal()),
    )


def import_duplicate(tcti: str, dup: TpmDuplicate) -> TpmKeyBlob:
    """TPM2_Import of ``dup`` under this TPM's storage key: the blob to write to disk."""
    tpm = _bindings()
    public = _unmarshal(tpm, tpm.TPM2B_PUBLIC, dup.public, "object public part")
    _check_hmac_public(tpm, public)
    duplicate = _unmarshal(tpm, tpm.TPM2B_PRIVATE, dup.duplicate, "duplicate")
    sym_seed = _unmarshal(tpm, tpm.TPM2B_ENCRYPTED_SECRET, dup.seed, "seed")
    esapi = _open(tpm, tcti)
    try:
        parent, parent_public = _create_parent(tpm, esapi)
        try:
            name = bytes(parent_public.get_name().marshal())
            if name != dup.parent:
                raise TpmError(_another_tpm(dup.parent, name, "wrapped for"))
            private = esapi.import_(
                parent,
                tpm.TPM2B_DATA(),
                public,
                duplicate,
                sym_seed,
                tpm.TPMT_SYM_DEF_OBJECT(algorithm=tpm.TPM2_ALG.NULL),
            )
        finally:
            esapi.flush_context(parent)
        return TpmKeyBlob(parent=name, public=dup.public, private=bytes(private.marshal()))
    except tpm.TSS2_Exception as err:
        raise TpmError(_describe(tpm, err)) from None
    finally:
        esapi.close()


class TpmHmacKey:
    """The site key's HMAC object loaded in a TPM. ``mac()`` from any thread, one at a time.

    Opening re-creates the storage key, checks it is the one the blob was wrapped under (else:
    another TPM, or this one was cleared) and loads the object. A command that fails closes the
    connection; the call reconnects and reloads once (a TPM reset, a restarted resource
    manager), then reports the reason as TpmError.
    """

    def __init__(self, tcti: str, blob: TpmKeyBlob) -> None:
        self.tcti = check_tcti(tcti)
        self.blob = blob
        self._tpm = _bindings()
        _check_hmac_public(
            self._tpm, _unmarshal(self._tpm, self._tpm.TPM2B_PUBLIC, blob.public, "public")
        )
        self._lock = threading.Lock()
        self._esapi: Any = None
        self._handle: Any = None
        self._closed = False
        with self._lock:
            self._connect()

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the TPM-held key; TpmError says why not."""
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_S):
            raise TpmError(f"the TPM at {self.tcti} has not answered an earlier command")
        try:
            if self._closed:
                raise TpmError("the TPM key was closed (site keys reloaded)")
            try:
                if self._esapi is None:
                    self._connect()
                return self._hmac(data)
            except TpmError:
                self._disconnect()
                # Once more from scratch: the object may be gone (TPM reset), not the TPM.
                self._connect()
                return self._hmac(data)
        except TpmError:
            self._disconnect()
            raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Flush the object and close the connection (waits for a command in flight)."""
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_S):
            logger.warning(
                "TPM at %s busy at close: connection left to the process exit", self.tcti
            )
            return
        try:
            self._closed = True
            self._disconnect()
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"TpmHmacKey(tcti={self.tcti!r}, parent={self.blob.parent.hex()[8:24]}…)"

    def _hmac(self, data: bytes) -> bytes:
        tpm = self._tpm
        try:
            digest = self._esapi.hmac(self._handle, data, tpm.TPM2_ALG.SHA256)
        except tpm.TSS2_Exception as err:
            raise TpmError(_describe(tpm, err)) from None
        return bytes(digest)

    def _connect(self) -> None:
        tpm = self._tpm
        esapi = _open(tpm, self.tcti)
        try:
            parent, parent_public = _create_parent(tpm, esapi)
            try:
                name = bytes(parent_public.get_name().marshal())
                if name != self.blob.parent:
                    raise TpmError(_another_tpm(self.blob.parent, name, "made for"))
                private = _unmarshal(tpm, tpm.TPM2B_PRIVATE, self.blob.private, "private part")
                public = _unmarshal(tpm, tpm.TPM2B_PUBLIC, self.blob.public, "public part")
                handle = esapi.load(parent, private, public)
            finally:
                esapi.flush_context(parent)
        except tpm.TSS2_Exception as err:
            esapi.close()
            raise TpmError(_describe(tpm, err)) from None
        except BaseException:
            esapi.close()
            raise
        self._esapi, self._handle = esapi, handle

    def _disconnect(self) -> None:
        esapi, handle = self._esapi, self._handle
        self._esapi = self._handle = None
        if esapi is None:
            return
        try:
            # Without a resource manager (/dev/tpm0, a bare simulator) a transient object
            # outlives the connection: flush it, or the TPM's few slots fill up.
            esapi.flush_context(handle)
        except self._tpm.TSS2_Exception as err:
            logger.debug("TPM flush at close failed: %s", _describe(self._tpm, err))
        finally:
            esapi.close()


# -- private helpers --------------------------------------------------------------------


def _bindings() -> ModuleType:
    """tpm2_pytss, or TpmError saying how to install it."""
    # The TSS libraries log every failed command to stderr; the agent reports its own one-line
    # reason instead. TSS2_LOG set by an operator (debugging) wins.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss as bindings
    except ImportError as err:
        raise TpmError(
            "the TPM bindings are not installed (tpm2-pytss: pip install 'cabinet-agent[tpm]', "
            f"which needs the TSS2 libraries, Debian libtss2-dev): {err}"
        ) from None
    module: ModuleType = bindings
    return module


def _open(tpm: ModuleType, tcti: str) -> Any:
    check_tcti(tcti)
    try:
        return tpm.ESAPI(tcti)
    except tpm.TSS2_Exception as err:
        raise TpmError(f"cannot reach the TPM at {tcti}: {err}") from None
    except RuntimeError as err:  # TCTILdr's own parsing
        raise TpmError(f"cannot reach the TPM at {tcti}: {err}") from None


def _parent_template(tpm: ModuleType) -> Any:
    """The storage key: the TCG provisioning guidance's ECC P-256 SRK template."""
    a = tpm.TPMA_OBJECT
    attrs = (
        a.FIXEDTPM
        | a.FIXEDPARENT
        | a.SENSITIVEDATAORIGIN
        | a.USERWITHAUTH
        | a.NODA
        | a.RESTRICTED
        | a.DECRYPT
    )
    public = tpm.TPMT_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs)
    public.unique.ecc.x = tpm.TPM2B_ECC_PARAMETER(bytes(32))
    public.unique.ecc.y = tpm.TPM2B_ECC_PARAMETER(bytes(32))
    return tpm.TPM2B_PUBLIC(public)


def _create_parent(tpm: ModuleType, esapi: Any) -> tuple[Any, Any]:
    """Re-create the storage key in the owner hierarchy (same seed, same template → same key)."""
    handle, public, _, _, _ = esapi.create_primary(
        tpm.TPM2B_SENSITIVE_CREATE(), _parent_template(tpm), tpm.ESYS_TR.OWNER
    )
    return handle, public


def _hmac_attributes(tpm: ModuleType) -> Any:
    a = tpm.TPMA_OBJECT
    # Not fixedTPM/fixedParent: TPM2_Import refuses those. Still nothing can export it:
    # duplicating (or re-keying) it needs its admin role, which adminWithPolicy puts behind its
    # authPolicy, and that is empty, so no policy session can ever satisfy it. noDA: its auth
    # value is empty (nothing to guess), so a dictionary-attack lockout caused by other software
    # on the controller must not lock people out of the cabinet.
    return a.SIGN_ENCRYPT | a.USERWITHAUTH | a.NODA | a.ADMINWITHPOLICY


def _hmac_public(tpm: ModuleType) -> Any:
    public = tpm.TPM2B_PUBLIC(
        tpm.TPMT_PUBLIC(
            type=tpm.TPM2_ALG.KEYEDHASH,
            nameAlg=tpm.TPM2_ALG.SHA256,
            objectAttributes=_hmac_attributes(tpm),
        )
    )
    details = public.publicArea.parameters.keyedHashDetail
    details.scheme.scheme = tpm.TPM2_ALG.HMAC
    details.scheme.details.hmac.hashAlg = tpm.TPM2_ALG.SHA256
    return public


def _check_hmac_public(tpm: ModuleType, public: Any) -> None:
    """Refuse an object that is not the non-exportable HMAC-SHA256 key this module makes."""
    area = public.publicArea
    ok = (
        area.type == tpm.TPM2_ALG.KEYEDHASH
        and area.nameAlg == tpm.TPM2_ALG.SHA256
        and int(area.objectAttributes) == int(_hmac_attributes(tpm))
        and len(bytes(area.authPolicy)) == 0
        and area.parameters.keyedHashDetail.scheme.scheme == tpm.TPM2_ALG.HMAC
        and area.parameters.keyedHashDetail.scheme.details.hmac.hashAlg == tpm.TPM2_ALG.SHA256
    )
    if not ok:
        raise TpmError(
            "the TPM object is not a cabinet-agent site key (a non-exportable HMAC-SHA256 key "
            "with no policy and no dictionary-attack protection)"
        )


def _check_parent_public(tpm: ModuleType, area: Any) -> None:
    template = _parent_template(tpm).publicArea
    if (
        area.type != tpm.TPM2_ALG.ECC
        or int(area.objectAttributes) != int(template.objectAttributes)
        or area.parameters.eccDetail.curveID != tpm.TPM2_ECC.NIST_P256
    ):
        raise TpmError("not a cabinet-agent TPM storage key (ECC P-256 SRK template)")


def _unmarshal(tpm: ModuleType, cls: Any, raw: bytes, what: str) -> Any:
    try:
        value, used = cls.unmarshal(raw)
    except (tpm.TSS2_Exception, ValueError, TypeError):
        raise TpmError(f"the {what} is not a valid TPM structure") from None
    if used != len(raw):
        raise TpmError(f"the {what} has {len(raw) - used} stray bytes after it")
    return value


def _another_tpm(expected: bytes, found: bytes, verb: str) -> str:
    return (
        f"{verb} another TPM: its storage key is {expected.hex()[8:24]}…, this TPM's is "
        f"{found.hex()[8:24]}… (a copied disk, a replaced board, or a TPM cleared since); "
        "enrol this TPM (docs/privacy.md §5)"
    )


def _describe(tpm: ModuleType, err: Any) -> str:
    """One line for a TSS error, with what it usually means here."""
    rc = tpm.TPM2_RC
    error = err.error
    text = str(err)
    if error == rc.LOCKOUT:
        return f"the TPM is in dictionary-attack lockout ({text})"
    if error in (rc.BAD_AUTH, rc.AUTH_FAIL):
        return f"the TPM refused the authorization: the owner hierarchy has a password? ({text})"
    if error == rc.INTEGRITY:
        return f"the TPM could not unwrap the key: made for another TPM or damaged ({text})"
    if error == rc.OBJECT_MEMORY:
        return f"the TPM has no free object slot: use the resource manager /dev/tpmrm0 ({text})"
    if error in (rc.RETRY, rc.YIELDED, rc.TESTING):
        return f"the TPM is busy ({text})"
    if (int(err.rc) >> 16) & 0xFF == 0x0A:  # TSS2_TCTI_RC_LAYER: the transport, not the TPM
        return f"the TPM does not answer ({text})"
    return text


def _table(table: object, names: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ValueError(f"tpm must be a table ({', '.join(names)})")
    unknown = sorted(str(k) for k in table if k not in names)
    if unknown:
        raise ValueError(f"tpm.{unknown[0]} is not a known field")
    out: dict[str, str] = {}
    for name in names:
        value = table.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"tpm.{name} must be a non-empty string")
        out[name] = value
    return out


def _hex(fields: dict[str, str], name: str) -> bytes:
    try:
        raw = bytes.fromhex(fields[name])
    except ValueError:
        raise ValueError(f"tpm.{name} must be hexadecimal") from None
    if not 2 <= len(raw) <= 68:
        raise ValueError(f"tpm.{name} is not a TPM name")
    return raw


def _blob(fields: dict[str, str], name: str) -> bytes:
    try:
        raw = base64.b64decode(fields[name], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"tpm.{name} is not valid base64") from None
    if not 2 <= len(raw) <= MAX_BLOB:
        raise ValueError(f"tpm.{name} must be 2 to {MAX_BLOB} bytes")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
