"""Mercury codec throughput vs the fastest stream a module can send.

Baseline: one streamed tag-record frame (EPC-96, the metadata the driver asks for) is
47 bytes; at the module's highest baud rate (921600, 8N1 → 10 bits per byte on the
wire) the module cannot send more than 921600 / (47 × 10) ≈ 1961 records per second.
The codec must decode comfortably faster than that on the target CPU.

Run: ``.venv/bin/python bench/serial.py [--records N] [--repeat R]``
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from drivers.mercury import codec
from drivers.mercury.codec import ResponseDecoder, TagRecord

MAX_BAUD = 921600
BITS_PER_BYTE = 10  # start + 8 data + stop


def record_frame(rng: random.Random) -> bytes:
    """One streamed tag record as a module sends it (layout checked in the tests)."""
    epc = rng.randbytes(12)
    body = (0x3000).to_bytes(2, "big") + epc
    data = (
        bytes([0x10, 0x00, 0x1B])
        + codec.META_DEFAULT.to_bytes(2, "big")
        + bytes([0x01, 0x01, 0xC9, 0x11])  # tag count, read count, RSSI, antenna
        + rng.randrange(902750, 927250).to_bytes(3, "big")
        + rng.randrange(0, 1 << 32).to_bytes(4, "big")
        + bytes([0x00, 0x00, 0x05, 0x00, 0x00, 0x0F])  # phase, protocol, data len, GPIO
        + (len(body) * 8 + 16).to_bytes(2, "big")
        + body
        + codec.gen2_crc16(body).to_bytes(2, "big")
    )
    return codec.encode(codec.Response(codec.Opcode.READ_TAG_ID_MULTIPLE, 0, data))


def chunked(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def best_rate(records: int, repeat: int, run: Callable[[], int]) -> float:
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = run()
        elapsed = time.perf_counter() - t0
        assert got == records, f"decoded {got} of {records}"
        best = max(best, records / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rng = random.Random(1)
    frames = [record_frame(rng) for _ in range(args.records)]
    frame_len = len(frames[0])
    stream = b"".join(frames)
    big = chunked(stream, 4096)
    small = chunked(stream[: frame_len * min(args.records, 2000)], 1)
    module_max = MAX_BAUD / (frame_len * BITS_PER_BYTE)

    def frames_only() -> int:
        dec = ResponseDecoder()
        return sum(len(dec.feed(c)) for c in big)

    def frames_and_records() -> int:
        dec = ResponseDecoder()
        n = 0
        for chunk in big:
            for frame in dec.feed(chunk):
                if isinstance(codec.parse_stream(frame), TagRecord):
                    n += 1
        return n

    def byte_at_a_time() -> int:
        dec = ResponseDecoder()
        n = 0
        for chunk in small:
            for frame in dec.feed(chunk):
                if isinstance(codec.parse_stream(frame), TagRecord):
                    n += 1
        return n

    rows = [
        (f"module maximum @ {MAX_BAUD} baud (computed)", module_max),
        ("codec: frames only, 4 KiB reads", best_rate(args.records, args.repeat, frames_only)),
        (
            "codec: frames + tag records, 4 KiB reads",
            best_rate(args.records, args.repeat, frames_and_records),
        ),
        (
            "codec: frames + tag records, 1-byte reads",
            best_rate(len(small) // frame_len, args.repeat, byte_at_a_time),
        ),
    ]
    print(f"tag record frame: {frame_len} bytes = {frame_len * BITS_PER_BYTE} bits on the wire")
    print(f"{'path':<48} {'records/s':>12} {'× module max':>13}")
    for name, rate in rows:
        print(f"{name:<48} {rate:>12,.0f} {rate / module_max:>13.1f}")
    headroom = rows[2][1] / module_max
    print(f"headroom factor (frames + records, 4 KiB reads vs module max): {headroom:.1f}×")


if __name__ == "__main__":
    main()
