"""capsedge: identify a shoulder implant's manufacturer from an X-ray on edge hardware."""

__version__ = "0.1.0"
