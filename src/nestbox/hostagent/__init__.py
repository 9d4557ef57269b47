"""The host agent: owns the microVMs (capsules) on one machine."""
