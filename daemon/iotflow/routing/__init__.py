"""Routing: which active connections an uplink goes to, by DevEUI."""

from __future__ import annotations

from iotflow.routing.index import RoutingIndex

__all__ = ["RoutingIndex"]
