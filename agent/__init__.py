"""cabinet-agent: the edge agent of an RFID smart cabinet."""

__version__ = "0.1.0"
