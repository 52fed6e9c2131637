"""Model and event-type configuration shared by every process.

One frozen pydantic object carries every hyper-parameter, so a store can record the settings it was
built with and refuse to reopen under incompatible ones (a different `dim` would corrupt rows).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EventTypeSpec(BaseModel):
    """How much one event of a type counts; `use_value` multiplies by the event's `value`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: float = Field(gt=0, allow_inf_nan=False)
    use_value: bool = False


DEFAULT_EVENT_TYPES: dict[str, EventTypeSpec] = {
    "view": EventTypeSpec(weight=1.0),
    "click": EventTypeSpec(weight=2.0),
    "add_to_cart": EventTypeSpec(weight=4.0),
    "purchase": EventTypeSpec(weight=8.0),
    "rating": EventTypeSpec(weight=1.0),
}

LOSS_CODES: dict[str, int] = {"logistic": 0, "bpr": 1}


class ModelConfig(BaseModel):
    """Hyper-parameters of the online model; defaults are the tuned MovieLens values (README)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(default=64, ge=1, le=1024, description="latent factors per user and item")
    loss: Literal["logistic", "bpr"] = "bpr"
    learning_rate: float = Field(default=0.05, gt=0, le=10, allow_inf_nan=False)
    reg: float = Field(default=0.002, ge=0, le=10, allow_inf_nan=False)
    reg_bias: float = Field(default=0.002, ge=0, le=10, allow_inf_nan=False)
    n_negatives: int = Field(default=8, ge=0, le=256)
    negative_exponent: float = Field(
        default=0.75, ge=0, le=2, description="negatives are drawn from popularity**exponent"
    )
    negative_weight: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False)
    # 180 days, not 30: popularity-drawn negatives then follow a longer memory of what is
    # popular (MovieLens Recall@10 +0.006; 7 days -0.018), docs/quality-ablation.md
    half_life_s: float = Field(
        default=180 * 86400.0, gt=0, allow_inf_nan=False, description="decay half-life (seconds)"
    )
    init_scale: float = Field(default=1.0, gt=0, le=10, allow_inf_nan=False)
    seed: int = Field(default=42, ge=0, lt=2**63)
    sampler_refresh: int = Field(
        default=10_000, ge=1, description="rebuild the negative sampler after this many events"
    )
    n_candidates: int = Field(
        default=2, ge=1, le=64, description="draws per negative; the highest-scoring one is used"
    )
    n_steps: int = Field(default=1, ge=1, le=16, description="SGD steps per event")
    lr_user: float = Field(
        default=2.5, gt=0, le=100, allow_inf_nan=False, description="user lr / learning_rate"
    )
    # 0 (no item biases): learnt against popularity-drawn negatives they fall for the items of a
    # niche and rise for lucky tail items, and swamp a niche user's affinity (0.2 gave niche
    # users 3.4-8.2 of 10 from their niche on the long-tail streams, docs/niche-ablation.md)
    lr_bias: float = Field(
        default=0.0, ge=0, le=100, allow_inf_nan=False, description="bias lr / learning_rate"
    )
    max_norm: float = Field(
        default=2.0, ge=0, allow_inf_nan=False, description="cap on vector norms (0: none)"
    )
    # 0.4 with lr_user 2.5 and no biases: MovieLens Recall@10 0.089 (0.0866 with biases), planted
    # tastes 191/200 users in their group, niches 10/10 (docs/niche-ablation.md); popularity-drawn
    # negatives stop the globally popular items of other groups from crowding every top-10
    uniform_mix: float = Field(
        default=0.4,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="share of negatives drawn uniformly; the rest follow popularity**exponent",
    )
    bias_uniform: bool = Field(
        default=False,
        description="item biases learn only from uniformly drawn negatives (popularity-drawn "
        "ones would teach them anti-popularity)",
    )
    # 0.1: MovieLens Recall@10 +0.005 on its own, +0.011 with the longer half-life; 0.3 and
    # more gain more on MovieLens but lose niche users their niche (docs/quality-ablation.md)
    user_pull: float = Field(
        default=0.1,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="after each event the user vector moves by this times the item's vector "
        "(recency of the user's own last items; no extra state)",
    )
    # 4 x each successor's share of its row: the default model's MovieLens Recall@10 0.0958 ->
    # 0.1105 with planted tastes and niches kept; 2 x log1p(count) / the row's largest gained
    # as much but lost planted tastes and niches (docs/quality-ablation.md, *Transitions*)
    transition_weight: float = Field(
        default=4.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="weight of the user's last item's successors (a decayed count of what "
        "followed it across users, normalised per row) added to the factor score (0: off, "
        "and the table and users' last items are not kept up to date meanwhile)",
    )
    transition_norm: Literal["max", "share"] = Field(
        default="share",
        description="how a transition row is scaled: max (log1p of each decayed count over "
        "the row's largest) or share (each decayed count over the row's total)",
    )
    transition_slots: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="successors kept per item (the weakest is replaced): items x this x 12 "
        "bytes of memory",
    )
    event_types: dict[str, EventTypeSpec] = Field(default_factory=lambda: dict(DEFAULT_EVENT_TYPES))

    @field_validator("event_types")
    @classmethod
    def _non_empty(cls, v: dict[str, EventTypeSpec]) -> dict[str, EventTypeSpec]:
        if not v:
            raise ValueError("at least one event type is needed, e.g. {'view': {'weight': 1}}")
        return v

    @property
    def loss_code(self) -> int:
        return LOSS_CODES[self.loss]

    @property
    def decay_rate(self) -> float:
        """ln 2 / half-life: log-weights grow by this per second of stream time."""
        return math.log(2.0) / self.half_life_s

    def structural(self) -> dict[str, object]:
        """Settings a stored model cannot change without being rebuilt from scratch. The
        half-life is one: popularity and confidences are stored as log-sums anchored at t=0 at
        its rate, so new events at another rate would be off by e^(t * difference) against them
        (the default went from 30 to 180 days: a store built before must keep its value)."""
        return {"dim": self.dim, "seed": self.seed, "half_life_s": self.half_life_s}


class RebuildConfig(BaseModel):
    """When and how to rebuild. Defaults fit MovieLens-sized data (README)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    every_events: int | None = Field(default=None, ge=1, description="rebuild after N events")
    every_seconds: float | None = Field(default=None, gt=0, description="rebuild every T s")
    alpha: float = Field(default=10.0, gt=0, description="confidence = 1 + alpha * c_ui")
    reg: float = Field(default=0.1, ge=0)
    iterations: int = Field(default=10, ge=1)
    solver: Literal["cg", "cholesky"] = "cg"
    cg_steps: int = Field(default=3, ge=1)
    min_confidence: float = Field(default=0.0, ge=0)
    max_rounds: int = Field(default=10, ge=1, description="catch-up rounds before the swap")
    catchup_sweeps: int = Field(
        default=3,
        ge=1,
        le=20,
        description="alternations (users, then items) over the rows a catch-up round re-solves: "
        "a taste that formed after the snapshot needs several (docs/niche-ablation.md)",
    )
    new_row_sweeps: int = Field(
        default=27,
        ge=0,
        le=100,
        description="further alternations over a catch-up round's rows while users registered "
        "after the snapshot, mostly of new items, still move: a niche of new users and new "
        "items was lost after 3 (docs/niche-ablation.md)",
    )
    final_rows: int = Field(
        default=1000,
        ge=1,
        description="catch up in the background until fewer rows remain; also the most rows "
        "the swap step re-solves",
    )
    guard_events: int = Field(
        default=1000, ge=0, description="incoming events the guard scores against both models"
    )
    guard_min_events: int = Field(
        default=200,
        ge=0,
        description="scored events the guard needs to judge; a rebuild swapped with fewer (at "
        "guard_timeout_s, on a quiet stream) is logged and counted as unguarded",
    )
    guard_per_batch: int = Field(default=128, ge=1)
    guard_timeout_s: float = Field(
        default=30.0, ge=0, description="swap on what was scored by then (low traffic)"
    )
    guard_margin: float = Field(
        default=0.05,
        ge=0,
        description="swap unless the new HR@10 is lower by more than this (absolute; with 1000 "
        "events the paired noise is about 0.02)",
    )
    after_rows: int = Field(
        default=1500,
        ge=1,
        description="re-solved rows applied (and committed) per step after the swap",
    )
    swap_budget_s: float = Field(
        default=0.02,
        ge=0,
        description="time from the start of the swap step after which it re-solves no more "
        "rows (the rest is finished after the swap): keeps the pause short on a loaded machine",
    )
    stage_blocks: int = Field(default=256, ge=1, description="blocks per staging WriteBatch")
    deterministic: bool = Field(
        default=False,
        description="run each rebuild inline, to completion, exactly every `every_events` "
        "events (micro-batches are cut there): the model is then a function of the input "
        "stream alone, the same across kills and restores; the loop pauses for the whole "
        "rebuild, and the guard scores no events (none arrive during it): it only checks the "
        "new model is finite. Off: in the background, within wall-clock budgets",
    )

    @model_validator(mode="after")
    def _deterministic_by_events(self) -> RebuildConfig:
        if self.deterministic and (self.every_events is None or self.every_seconds is not None):
            raise ValueError(
                "rebuild.deterministic schedules rebuilds by event count only: set "
                "rebuild.every_events and leave rebuild.every_seconds unset"
            )
        return self

    def inline(self) -> RebuildConfig:
        """The settings a deterministic (inline) rebuild runs with: no wall-clock budget cuts
        the swap, and the guard, which would wait for events that cannot arrive while the loop
        is paused, is off (the finiteness check stays)."""
        return self.model_copy(update={"swap_budget_s": math.inf, "guard_events": 0})


def keep_structural(built: ModelConfig, asked: ModelConfig) -> ModelConfig:
    """`asked`, with the structural settings it leaves at their defaults taken from the model
    as `built`: a default that changes between releases (the half-life went from 30 to 180
    days) must not lock an existing store out of an upgrade, while a value given on purpose
    that differs is still refused by the caller."""
    kept = {k: v for k, v in built.structural().items() if k not in asked.model_fields_set}
    return asked.model_copy(update=kept) if kept else asked
