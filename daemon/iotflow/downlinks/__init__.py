"""Downlinks: commands from a cloud back to a device, through its network server."""

from iotflow.downlinks.model import DownlinkHandler, DownlinkRejected, DownlinkRequest

__all__ = ["DownlinkHandler", "DownlinkRejected", "DownlinkRequest"]
