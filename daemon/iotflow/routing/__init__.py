"""Routing: which active connections an uplink goes to, by DevEUI."""

from __future__ import annotations

from iotflow.routing.index import RoutingIndex, Target

__all__ = ["RoutingIndex", "Target"]
