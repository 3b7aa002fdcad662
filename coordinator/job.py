"""Job specs: what an admin submits (`panal admin job submit JOB.yaml`), validated with pydantic.

Errors name the field and the fix. Example::

    name: demo
    model: {preset: tiny}
    dataset: QmDatasetManifestCid…
    pools: [pool-a, pool-b]
    stages: 2
    rounds: 5
    inner_steps: 20
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordinator.aggregation import AggregationConfig
from coordinator.defence import DefenceConfig
from coordinator.detection import DetectionPolicy
from coordinator.outer import OuterOptimizer
from model.config import GPTConfig, ModelConfigError
from model.presets import config_from_mapping
from storage.cid import CID, InvalidCIDError

MAX_SPEC_BYTES = 1 << 20
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class JobSpecError(ValueError):
    """A job spec that cannot be accepted; the message lists each field and its fix."""


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": "tiny"})
    dataset: str
    pools: list[str] = Field(min_length=1)
    stages: int = Field(2, ge=1)
    rounds: int = Field(5, ge=1)
    inner_steps: int = Field(20, ge=1)
    micro_batch: int = Field(4, ge=1)
    grad_accum: int = Field(2, ge=1)
    lr: float = Field(6e-4, gt=0)
    warmup_frac: float = Field(0.02, ge=0, lt=1)
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    outer: OuterOptimizer = OuterOptimizer()
    # The poisoning defence (see README "Poisoning defence"): a robust rule, detection of
    # outliers against its aggregate, and quarantine after repeated rejections.
    aggregation: AggregationConfig = DefenceConfig().aggregation
    detection: DetectionPolicy = DefenceConfig().detection
    quarantine_window: int = Field(3, ge=1)
    quarantine_threshold: int = Field(2, ge=1)
    compression: Literal["none", "fp16", "int8"] = "none"
    min_pools: int = Field(1, ge=1)
    round_timeout_s: float = Field(600, gt=0)
    world_timeout_s: float = Field(60, gt=0)
    eval_batches: int = Field(4, ge=0)
    seed: int = Field(0, ge=0)

    @field_validator("dataset")
    @classmethod
    def _dataset_cid(cls, v: str) -> str:
        try:
            CID.parse(v)
        except InvalidCIDError as e:
            raise ValueError(
                f"{e}; give the dataset manifest CID printed by `panal corpus prepare`"
            ) from None
        return v

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            if not re.match(NAME_PATTERN, p):
                raise ValueError(f"pool name {p!r} must be lowercase letters, digits, '-', '_' or '.'")
        if len(set(v)) != len(v):
            raise ValueError("pool names must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.min_pools > len(self.pools):
            raise ValueError(
                f"min_pools {self.min_pools} is more than the {len(self.pools)} pools listed; "
                f"lower min_pools or list more pools"
            )
        if not 1 <= self.quarantine_threshold <= self.quarantine_window:
            raise ValueError(
                f"quarantine_threshold {self.quarantine_threshold} must be between 1 and quarantine_window "
                f"{self.quarantine_window}"
            )
        config = self.gpt_config()
        if self.stages > config.n_layer:
            raise ValueError(
                f"stages {self.stages} is more than the model's {config.n_layer} layers; use at most {config.n_layer}"
            )
        return self

    def gpt_config(self) -> GPTConfig:
        try:
            return config_from_mapping(self.model)
        except ModelConfigError as e:
            raise ValueError(f"model: {e}") from None

    def defence(self) -> DefenceConfig:
        return DefenceConfig(
            aggregation=self.aggregation,
            detection=self.detection,
            reputation_window=self.quarantine_window,
            reputation_threshold=self.quarantine_threshold,
        )

    @property
    def total_inner_steps(self) -> int:
        return self.rounds * self.inner_steps

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it (check its spelling against the documented fields)"
        elif err["type"] == "missing":
            msg = "required; add it"
        lines.append(f"  {where}: {msg}")
    return "job spec is invalid:\n" + "\n".join(lines)


def parse_job(text: str) -> JobSpec:
    """A JobSpec from YAML or JSON text; JobSpecError lists every problem with its fix."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise JobSpecError(f"job spec is over {MAX_SPEC_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobSpecError(f"job spec is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise JobSpecError("a job spec is a mapping of fields (name, dataset, pools, …)")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise JobSpecError(_explain(e)) from None
