"""`actility-cumulocity-iot`: Cumulocity's REST API (its sink comes with issue #6)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from iotflow.config.types import Secret
from iotflow.connectors.common import CommonConfig


class CumulocityConfig(CommonConfig):
    hostName: Annotated[str, Field(min_length=1, max_length=255)]
    tenantId: Annotated[str, Field(min_length=1, max_length=64)]
    username: Annotated[str, Field(min_length=1, max_length=128)]
    password: Secret
