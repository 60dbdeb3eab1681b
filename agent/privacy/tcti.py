"""Where the TPM is (``[privacy] tpm_tcti``): the setting's shape, checked with the config.

Apart from ``agent.privacy.tpm`` so that validating a config, which every daemon does, does not
load the TPM code; that is imported only for a site key held in a TPM.
"""

from __future__ import annotations

import re
from typing import Final

# The kernel's resource manager: it flushes what a process leaves loaded and lets several
# programs share the TPM. /dev/tpm0 (no resource manager) works too, for one program at a time.
DEFAULT_TCTI: Final = "device:/dev/tpmrm0"
# "<tcti name>[:<its configuration>]" as tpm2-tools take it (TCTILdr).
TCTI_PATTERN: Final = r"[a-z0-9_-]{1,32}(:[\x21-\x7e]{1,200})?"
_TCTI_RE: Final = re.compile(TCTI_PATTERN)


def check_tcti(tcti: str) -> str:
    """``tcti`` if it has the shape ``name[:conf]``; ValueError otherwise."""
    if not isinstance(tcti, str) or _TCTI_RE.fullmatch(tcti) is None:
        raise ValueError(f"TPM TCTI must match {TCTI_PATTERN} (e.g. {DEFAULT_TCTI})")
    return tcti
