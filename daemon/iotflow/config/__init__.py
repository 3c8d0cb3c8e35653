"""Configuration: the TOML file (`load`), its typed models (`model`), value types (`types`).

Nothing is imported here: `types` is used by the connector models, which `load` itself
imports, so an eager import would make a cycle.
"""
