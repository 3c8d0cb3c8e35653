"""Downlinks: commands from a cloud back to a device, through its network server."""

from iotflow.downlinks.model import REASONS, DownlinkHandler, DownlinkRejected, DownlinkRequest
from iotflow.downlinks.parse import parse_downlink

__all__ = ["REASONS", "DownlinkHandler", "DownlinkRejected", "DownlinkRequest", "parse_downlink"]
