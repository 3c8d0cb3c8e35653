"""Per-connection transformations of the uplink document (`upOperations`).

Validated at the edge (`parse_operations`), compiled once per connection worker
(`Pipeline`), applied by the worker before the sink so that every connector gets them.
"""

from iotflow.processors.operations import TYPES, parse_operations
from iotflow.processors.pipeline import Pipeline, ProcessorError

__all__ = ["TYPES", "Pipeline", "ProcessorError", "parse_operations"]
