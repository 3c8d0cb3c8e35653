"""Uplink formats: decode what the network servers publish, render what the clouds receive.

Pure code, no I/O.
"""

from iotflow.formats.decode import FORMATS, MAX_UPLINK_BYTES, decode
from iotflow.formats.fields import normalize_dev_eui
from iotflow.formats.render import (
    Template,
    actility_document,
    render_body,
    render_template,
    resolve_path,
)
from iotflow.formats.uplink import Gateway, Radio, Uplink

__all__ = [
    "FORMATS",
    "MAX_UPLINK_BYTES",
    "Gateway",
    "Radio",
    "Template",
    "Uplink",
    "actility_document",
    "decode",
    "normalize_dev_eui",
    "render_body",
    "render_template",
    "resolve_path",
]
