"""LLRP readers (Impinj, Zebra): sans-IO framing, sllurp codec, asyncio transport."""
