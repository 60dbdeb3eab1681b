"""LLRP 1.0.1 reader simulator (Impinj Speedway R420 / Zebra FX9600 personalities).

```python
async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=1) as sim:
    sim.add_tag(SimTag(epc="3008...", antenna=1, rssi_mean=-55.0))
    ...  # connect an LLRP client to sim.host:sim.port
```
"""

from simulators.llrp.codec import (
    Bits,
    ConnectionAttemptStatus,
    LlrpCodecError,
    Message,
    StatusCode,
    decode_message,
    encode_message,
    epc_hex,
)
from simulators.llrp.faults import Faults
from simulators.llrp.personality import IMPINJ, PERSONALITIES, ZEBRA, Personality
from simulators.llrp.simulator import ConnectionStats, GpoWrite, LlrpSimulator, SimStats
from simulators.llrp.tags import SimTag, neighbour_tag

__all__ = [
    "IMPINJ",
    "PERSONALITIES",
    "ZEBRA",
    "Bits",
    "ConnectionAttemptStatus",
    "ConnectionStats",
    "Faults",
    "GpoWrite",
    "LlrpCodecError",
    "LlrpSimulator",
    "Message",
    "Personality",
    "SimStats",
    "SimTag",
    "StatusCode",
    "decode_message",
    "encode_message",
    "epc_hex",
    "neighbour_tag",
]
