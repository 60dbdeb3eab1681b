"""``cabinetctl tpm storage-key|import``: enrol this cabinet's TPM with a p3 site key.

The technician's two steps around the backend's one (docs/privacy.md §5): hand the TPM's
storage key to the backend, import what the backend wrapped for it. The TPM is the one
``[privacy] tpm_tcti`` of ``--config`` names, or ``--tcti``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli.common import DEFAULT_CONFIG, load_or_exit

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69  # sysexits.h: the TPM is unreachable, refuses, or is another TPM


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tpm = sub.add_parser("tpm", help="enrol this cabinet's TPM with a p3 site key")
    tpm_sub = tpm.add_subparsers(dest="tpm_command", required=True)

    sk = tpm_sub.add_parser(
        "storage-key", help="write this TPM's storage key (public part) for the backend"
    )
    sk.add_argument("-o", "--out", type=Path, help="write here (default stdout)")
    _tpm_options(sk)
    sk.set_defaults(func=_cmd_storage_key)

    imp = tpm_sub.add_parser(
        "import", help="import a site key the backend wrapped for this TPM; write its key file"
    )
    imp.add_argument("file", type=Path, help="the backend's site-key-tpm-import file")
    imp.add_argument(
        "-o", "--out", type=Path, required=True, help="the site key file to write (0600)"
    )
    imp.add_argument("--force", action="store_true", help="replace an existing key file")
    _tpm_options(imp)
    imp.set_defaults(func=_cmd_import)


def _tpm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tcti", help="the TPM (default: [privacy] tpm_tcti of --config)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _tcti(args: argparse.Namespace) -> str:
    if args.tcti is not None:
        return str(args.tcti)
    return load_or_exit(args.config).privacy.tpm_tcti


def _cmd_storage_key(args: argparse.Namespace) -> int:
    from agent.privacy.enrolment import storage_key_text, write_storage_key
    from agent.privacy.tpm import TpmError, check_tcti, parent_name, storage_parent

    tcti = _tcti(args)
    try:
        public = storage_parent(check_tcti(tcti))
    except (TpmError, ValueError) as err:
        print(f"tpm storage-key: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.out is None:
        sys.stdout.write(storage_key_text(public))
        return EX_OK
    write_storage_key(args.out, public)
    name = parent_name(public).hex()
    if args.json:
        print(json.dumps({"ok": True, "file": str(args.out), "storage_key": name}))
    else:
        print(
            f"wrote this TPM's storage key ({name[8:24]}…) to {args.out}: the backend wraps "
            "the site key to it (cabinet-consumer tpm-wrap)"
        )
    return EX_OK


def _cmd_import(args: argparse.Namespace) -> int:
    from agent.privacy.enrolment import import_into, read_site_key_import
    from agent.privacy.keyfile import KeyFileError
    from agent.privacy.pseudonym import Pseudonymizer, write_tpm_site_key
    from agent.privacy.tpm import TpmError, TpmHmacKey, check_tcti

    out: Path = args.out
    if out.exists() and not args.force:
        print(f"tpm import: {out} exists (use --force to replace it)", file=sys.stderr)
        return EX_USAGE
    try:
        imp = read_site_key_import(args.file)
    except KeyFileError as err:
        print(f"tpm import: {err}", file=sys.stderr)
        return EX_DATAERR
    tcti = _tcti(args)
    try:
        key = import_into(check_tcti(tcti), imp)
        # Prove it: the TPM loads what is about to be written and computes with it.
        device = TpmHmacKey(tcti, key.blob)
        try:
            Pseudonymizer.held_in(key.site_id, key.kid, key.argon2, device).keyed_mac(b"0")
        finally:
            device.close()
    except (TpmError, ValueError) as err:
        print(f"tpm import: {args.file}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    write_tpm_site_key(out, key)
    if args.json:
        print(json.dumps({"ok": True, "file": str(out), "key": key.prefix, "site": key.site_id}))
    else:
        print(
            f"wrote site key {key.prefix} (site {key.site_id}, held in the TPM at {tcti}) to "
            f"{out}: point [privacy] site_key at it (docs/privacy.md §5)"
        )
    return EX_OK
