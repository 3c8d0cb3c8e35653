"""Flows: route uplinks to connections by matchers (keys, tags, applications, ranges)."""

from __future__ import annotations

from iotflow.flows.model import (
    ApplicationMatcher,
    Flow,
    FlowConnector,
    FlowDriver,
    FlowInput,
    FlowView,
    KeyMatcher,
    Matcher,
    RangeMatcher,
    ThingMatcher,
    parse_flow,
)

__all__ = [
    "ApplicationMatcher",
    "Flow",
    "FlowConnector",
    "FlowDriver",
    "FlowInput",
    "FlowView",
    "KeyMatcher",
    "Matcher",
    "RangeMatcher",
    "ThingMatcher",
    "parse_flow",
]
