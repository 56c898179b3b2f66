"""A stage that describes itself: what it reads, what it writes, how it is built and run.

Every stage file in actors/ holds one UDF class (a callable on a `pyarrow.Table`, Ray Data's
`map_batches` contract) with
    READS   the columns it needs (checked first thing: `require_columns`),
    WRITES  the columns it adds,
    spec()  a classmethod: how it is built from its config section -> a `StageSpec`
            (the class, its constructor kwargs, its pool's `StageResources`).
A graph is a list of specs (pipeline/streams.py, pipeline/generate.py, ...). That one list
drives the Ray Data graph (`apply`), the in-process runner (`run_here`: the same stages called
in this process, no Ray), the pool sizing (pipeline/pools.py: `fit_pools`) and the columns
test (tests/stages/test_columns.py), so a stage cannot be in one and missing from another.
The shape follows Ray's `ray.llm` batch stages (a UDF class plus its `map_batches` arguments).

Ray is imported only where a graph is built (`apply`): the in-process runner and the unit
tests use these without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from actors.common.schema import require_columns


@dataclass
class StageResources:
    """How one stage runs: an actor pool of min..max actors, each with these resources.

    On a 2-core machine the pools together must leave CPU for Ray Data's own tasks: a pool
    that takes every CPU hangs the job, so shares are fractional by default.
    """

    num_cpus: float = 0.25
    num_gpus: float = 0.0
    min_actors: int = 1
    # The pool's ceiling: a number (the user's upper bound; shrunk towards min_actors when the
    # cluster cannot hold it), or "auto": as many as the cluster holds (pipeline/pools.py).
    max_actors: int | Literal["auto"] = 1
    batch_size: int = 8
    # Batches queued per actor. 1 spreads work over the whole pool as soon as one actor is
    # busy (Ray Data would otherwise queue blocks on the actor next to them).
    max_tasks_in_flight: int = 2

    def validate(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus: must be >= 0")
        top = self.min_actors if self.max_actors == "auto" else self.max_actors
        if not 1 <= self.min_actors <= top:
            raise ValueError(f"need 1 <= min_actors <= max_actors (or max_actors: auto), got "
                             f"{self.min_actors}, {self.max_actors}")
        if self.max_tasks_in_flight < 1:
            raise ValueError(f"max_tasks_in_flight: must be >= 1, got {self.max_tasks_in_flight}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    def map_batches_kwargs(self, **constructor_kwargs: Any) -> dict[str, Any]:
        from ray.data import ActorPoolStrategy

        if self.max_actors == "auto":
            raise ValueError("max_actors: auto is resolved for a cluster first "
                             "(pipeline/pools.py:fit_pools)")
        return dict(
            compute=ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                      max_tasks_in_flight_per_actor=self.max_tasks_in_flight),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs=constructor_kwargs,
        )


@dataclass(frozen=True)
class Companion:
    """Actors a stage's actor starts itself, outside Ray Data's pool (a sequence-parallel
    sampler's extra ranks): `per_actor` of them for each pool actor. The fit counts them."""

    name: str  # as messages say it ("sampler ranks")
    key: str  # the config key of their CPU share ("sampler.num_cpus_per_rank")
    per_actor: int
    num_cpus: float | Literal["auto"]  # "auto": an equal share of what the pools leave
    num_gpus: float
    kwarg: tuple[str, str]  # where the stage's constructor kwargs carry the CPU share


@dataclass(frozen=True)
class StageSpec:
    """One stage of a graph: `cls(**kwargs)` run by an actor pool with `resources`."""

    name: str  # its pool's config key (`probe`, `decode`, ...): what budget messages name
    cls: type
    kwargs: dict[str, Any]
    resources: StageResources
    companions: tuple[Companion, ...] = ()  # actors the stage starts itself
    # (reads, writes) when they are not the class's READS / WRITES (a `chain` of stages)
    columns: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @property
    def reads(self) -> tuple[str, ...]:
        return self.columns[0] if self.columns else tuple(self.cls.READS)

    @property
    def writes(self) -> tuple[str, ...]:
        return self.columns[1] if self.columns else tuple(self.cls.WRITES)

    def build(self) -> Any:
        """The stage object, in this process."""
        return self.cls(**self.kwargs)

    def apply(self, ds: Any) -> Any:
        """`ds` with this stage added as an actor-pool `map_batches` (lazy)."""
        return ds.map_batches(self.cls, **self.resources.map_batches_kwargs(**self.kwargs))


class ChainedStage:
    """Several stages run by one actor, one after another on each batch: pools that share a
    process. On a small machine each actor process costs a second or two of CPU before its
    first row (a worker start, torch's import, a model load), and the frames or features
    between the chained stages stay in the process instead of crossing the object store."""

    def __init__(self, stages: Sequence[tuple[type, dict[str, Any]]]):
        self.stages = [cls(**kwargs) for cls, kwargs in stages]
        self.reads = self.columns(stages)[0]
        self.label = " + ".join(cls.__name__ for cls, _ in stages)

    @staticmethod
    def columns(stages: Sequence[tuple[type, dict[str, Any]]]
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(reads, writes) of the chain: what its first stages need from outside it, and what
        it adds that no later stage of it drops."""
        reads: list[str] = []
        writes: list[str] = []
        for cls, _ in stages:
            reads += [c for c in cls.READS if c not in writes and c not in reads]
            dropped = set(getattr(cls, "DROPS", ()))
            writes = [c for c in writes if c not in dropped] + list(cls.WRITES)
        return tuple(reads), tuple(writes)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.reads, self.label)  # all of them, before any work
        for stage in self.stages:
            batch = stage(batch)
        return batch


def chain(name: str, specs: Sequence[StageSpec]) -> StageSpec:
    """`specs` as one stage named `name`, run with the resources of the one of them so named
    (its pool's config section), their companions together."""
    owner = next(s for s in specs if s.name == name)
    stages = [(s.cls, s.kwargs) for s in specs]
    return StageSpec(name, ChainedStage, {"stages": stages}, owner.resources,
                     tuple(c for s in specs for c in s.companions), ChainedStage.columns(stages))


def apply_all(ds: Any, specs: Sequence[StageSpec]) -> Any:
    """A Ray Dataset through every stage of `specs`, in order (lazy)."""
    for spec in specs:
        ds = spec.apply(ds)
    return ds


def run_here(table: pa.Table, specs: Sequence[StageSpec]) -> pa.Table:
    """The same stages called in this process, one after another, on one table (no Ray)."""
    for spec in specs:
        table = spec.build()(table)
    return table
