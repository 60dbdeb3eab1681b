"""A simulated Mercury serial UHF module (pseudo-terminal or TCP), with fault switches."""

from simulators.mercury.sim import Faults, MercurySimulator, SimTag

__all__ = ["Faults", "MercurySimulator", "SimTag"]
