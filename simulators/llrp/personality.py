"""Reader personalities: what the simulated reader says it is and can do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulators.llrp.codec import VENDOR_IMPINJ, VENDOR_ZEBRA

# Mode table of a Speedway R420 (FCC), as a real one reports it: (mode id, DR, M, forward link
# modulation, spectral mask, BDR, PIE, min/max/step Tari).
_IMPINJ_MODES = (
    (0, 1, 0, 2, 2, 640000, 1500, 6250, 6250, 0),
    (1, 1, 1, 2, 2, 640000, 1500, 6250, 6250, 0),
    (2, 1, 2, 0, 3, 274000, 2000, 20000, 20000, 0),
    (3, 1, 3, 0, 3, 170600, 2000, 20000, 20000, 0),
    (4, 1, 2, 0, 2, 640000, 1500, 7140, 7140, 0),
    (1000, 0, 0, 0, 0, 40000, 1500, 6250, 6250, 0),
    (1002, 0, 0, 0, 0, 40000, 1500, 6250, 6250, 0),
)
_ZEBRA_MODES = (
    (0, 1, 0, 2, 2, 640000, 1500, 6250, 6250, 0),
    (1, 1, 1, 2, 2, 640000, 1500, 6250, 6250, 0),
    (2, 1, 2, 0, 3, 274000, 2000, 20000, 20000, 0),
    (3, 1, 3, 0, 3, 170600, 2000, 20000, 20000, 0),
    (23, 0, 2, 0, 2, 320000, 2000, 12500, 12500, 0),
)
# FCC hop table order as a Speedway reports it (kHz).
_FCC_HOPS = [902750 + 500 * i for i in range(50)]


@dataclass(frozen=True)
class Personality:
    """Identity and capabilities of one reader model."""

    name: str
    manufacturer: int
    model: int
    firmware: str
    max_antennas: int
    power_dbm: tuple[float, ...]  # index 1.. in LLRP's TransmitPowerLevelTableEntry
    num_gpis: int
    num_gpos: int
    modes: tuple[tuple[int, ...], ...]
    max_rospecs: int
    max_access_specs: int
    max_select_filters: int
    impinj_extensions: bool
    reader_id: bytes

    def capabilities(self, antennas: int) -> dict[str, Any]:
        """GET_READER_CAPABILITIES_RESPONSE parameters (status added by the caller)."""
        return {
            "GeneralDeviceCapabilities": {
                "MaxNumberOfAntennaSupported": antennas,
                "CanSetAntennaProperties": False,
                "HasUTCClockCapability": True,
                "DeviceManufacturerName": self.manufacturer,
                "ModelName": self.model,
                "ReaderFirmwareVersion": self.firmware,
                "ReceiveSensitivityTableEntry": [
                    {"Index": 1, "ReceiveSensitivityValue": 0},
                    *({"Index": i, "ReceiveSensitivityValue": 8 + i} for i in range(2, 43)),
                ],
                "GPIOCapabilities": {"NumGPIs": self.num_gpis, "NumGPOs": self.num_gpos},
                "PerAntennaAirProtocol": [
                    {"AntennaID": a, "ProtocolID": b"\x01"} for a in range(1, antennas + 1)
                ],
            },
            "LLRPCapabilities": {
                "CanDoRFSurvey": False,
                "CanReportBufferFillWarning": True,
                "SupportsClientRequestOpSpec": False,
                "CanDoTagInventoryStateAwareSingulation": False,
                "SupportsEventAndReportHolding": True,
                "MaxNumPriorityLevelsSupported": 1,
                "ClientRequestOpSpecTimeout": 0,
                "MaxNumROSpecs": self.max_rospecs,
                "MaxNumSpecsPerROSpec": 32,
                "MaxNumInventoryParameterSpecsPerAISpec": 1,
                "MaxNumAccessSpecs": self.max_access_specs,
                "MaxNumOpSpecsPerAccessSpec": 8,
            },
            "RegulatoryCapabilities": {
                "CountryCode": 840,
                "CommunicationsStandard": 1,
                "UHFBandCapabilities": {
                    "TransmitPowerLevelTableEntry": [
                        {"Index": i, "TransmitPowerValue": round(dbm * 100)}
                        for i, dbm in enumerate(self.power_dbm, start=1)
                    ],
                    "FrequencyInformation": {
                        "Hopping": True,
                        "FrequencyHopTable": [{"HopTableID": 1, "Frequency": _FCC_HOPS}],
                    },
                    "UHFC1G2RFModeTable": {
                        "UHFC1G2RFModeTableEntry": [_mode_entry(m) for m in self.modes]
                    },
                },
            },
            "C1G2LLRPCapabilities": {
                "CanSupportBlockErase": False,
                "CanSupportBlockWrite": True,
                "MaxNumSelectFiltersPerQuery": self.max_select_filters,
            },
        }

    @property
    def hop_channels(self) -> int:
        return len(_FCC_HOPS)


def _mode_entry(m: tuple[int, ...]) -> dict[str, Any]:
    mode_id, dr, mval, flm, mask, bdr, pie, tmin, tmax, tstep = m
    return {
        "ModeIdentifier": mode_id,
        "DRValue": bool(dr),
        "EPCHAGTCConformance": False,
        "MValue": mval,
        "ForwardLinkModulation": flm,
        "SpectralMaskIndicator": mask,
        "BDRValue": bdr,
        "PIEValue": pie,
        "MinTariValue": tmin,
        "MaxTariValue": tmax,
        "StepTariValue": tstep,
    }


def _table(lo: float, hi: float, step: float) -> tuple[float, ...]:
    n = round((hi - lo) / step) + 1
    return tuple(round(lo + i * step, 2) for i in range(n))


# A Speedway R420 on an FCC region reports 81 levels, 10.00-30.00 dBm in 0.25 dB steps (see the
# captured GET_READER_CAPABILITIES_RESPONSE in shared/llrp-captures).
IMPINJ = Personality(
    name="impinj",
    manufacturer=VENDOR_IMPINJ,
    model=2001002,
    firmware="5.14.0.240",
    max_antennas=4,
    power_dbm=_table(10.0, 30.0, 0.25),
    num_gpis=4,
    num_gpos=4,
    modes=_IMPINJ_MODES,
    max_rospecs=1,
    max_access_specs=1508,
    max_select_filters=2,
    impinj_extensions=True,
    reader_id=bytes.fromhex("001625ffff1125d6"),
)
# An FX9600: 8 ports, 10.0-31.5 dBm in 0.1 dB steps.
ZEBRA = Personality(
    name="zebra",
    manufacturer=VENDOR_ZEBRA,
    model=9600,
    firmware="3.10.30",
    max_antennas=8,
    power_dbm=_table(10.0, 31.5, 0.1),
    num_gpis=4,
    num_gpos=4,
    modes=_ZEBRA_MODES,
    max_rospecs=32,
    max_access_specs=64,
    max_select_filters=32,
    impinj_extensions=False,
    reader_id=bytes.fromhex("84248dfffe0a1b2c"),
)
PERSONALITIES = {p.name: p for p in (IMPINJ, ZEBRA)}
