"""The base of every scenario model: unknown keys, non-finite numbers and true/false given for a number are all
refused (pydantic's strict mode: no coercion between types; every scenario value comes from YAML, which already
has the right types), so nothing a user wrote by mistake is silently taken for something else."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
