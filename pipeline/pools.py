"""Actor pools that fit the cluster they run on: one rule for every command.

A graph's stages (`StageSpec`s) ask for actor pools: `min_actors`..`max_actors` actors of
`num_cpus` / `num_gpus` each, plus the actors a stage starts itself (`Companion`s: a
sequence-parallel sampler's extra ranks) and the fixed demands of the job (Ray Train workers).
Ray Data hangs forever when the pools together hold every CPU (its own read tasks never get
scheduled), so before any work `fit_pools` sizes them to the cluster, keeping `RESERVE_CPUS`
free:

1. The minimums (every pool at `min_actors`, companions at their CPU share, fixed demands)
   must fit, or the job is refused in one line that names the `--set` keys to paste.
2. A companion share of `auto` is an equal share of what the minimums leave (at most 1 CPU,
   at least `MIN_SHARE`).
3. An explicit `max_actors` is the user's upper bound: when the explicit pools do not fit, the
   largest shrink towards `min_actors`, and one line says what was chosen.
4. `max_actors: auto` pools then grow one actor at a time, the heaviest pool first, while the
   CPUs and GPUs last (never past one actor per CPU of the cluster). Ray Data starts a pool at
   `min_actors` and adds actors only while work queues, so `auto` is a ceiling, not a cost.

A local Ray (no `--address`) has a known size, known before it starts: the pools are fitted
and refused before any Ray work. A joined cluster is sized from its resources once joined;
it may grow (an autoscaler adds nodes on demand), so there explicit numbers are kept as asked
and only `auto` is resolved.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from actors.common.stage import StageResources, StageSpec
from pipeline.config import ConfigError

RESERVE_CPUS = 0.25  # left free for Ray Data's own tasks (reads, splits)
MIN_SHARE = 0.1  # the smallest CPU share an `auto` companion rank may get
T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    fixed: bool  # a local Ray of known size; False: a joined cluster, which may grow


@dataclass
class Fixed:
    """A fixed demand of the job beside its pools (Ray Train workers): `count` x resources."""

    name: str
    count: int
    num_cpus: float
    num_gpus: float
    keys: tuple[str, str]  # its config keys: (count, per-worker CPUs)


def train_workers(cfg: Any) -> Fixed:
    """The Ray Train workers of a trainer's config (`num_workers` x `worker`)."""
    return Fixed("worker", cfg.num_workers, cfg.worker.num_cpus, cfg.worker.num_gpus,
                 ("num_workers", "worker.num_cpus"))


def cluster_of(address: str | None, ray_num_cpus: int) -> Cluster | None:
    """The cluster a job will run on: a local Ray not started yet (`ray_num_cpus`, 0 = this
    machine's CPUs; GPUs torch sees), a joined one once Ray runs, or None (joining, not yet)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Cluster(float(ray_num_cpus or os.cpu_count() or 1), gpus, fixed=True)
    import ray

    if not ray.is_initialized():
        return None
    total = ray.cluster_resources()
    return Cluster(total.get("CPU", 0.0), total.get("GPU", 0.0), fixed=False)


def sized(label: str, cfg: T, graph: Callable[[T], Sequence[StageSpec]], address: str | None,
          fixed: Sequence[Fixed] = ()) -> T:
    """`fit_pools` of the graph `graph(cfg)` on the cluster the command runs on (`cfg.ray`).
    Every command calls it twice: before Ray starts (a local Ray: sized, or refused, before
    any Ray work) and inside its Ray session (a joined cluster: sized from its resources; a
    local Ray: nothing changes the second time)."""
    return fit_pools(label, cfg, graph(cfg), cluster_of(address, cfg.ray.num_cpus), fixed)


def config_keys(cfg: Any, prefix: str = "") -> dict[int, str]:
    """id(StageResources) -> its dotted key in the config `cfg` (what `--set` takes)."""
    keys: dict[int, str] = {}
    if not dataclasses.is_dataclass(cfg):
        return keys
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, StageResources):
            keys[id(value)] = prefix + f.name
        elif dataclasses.is_dataclass(value):
            keys.update(config_keys(value, f"{prefix}{f.name}."))
    return keys


@dataclass
class _Pool:
    spec: StageSpec
    key: str
    n: int  # actors chosen so far
    auto: bool
    asked: int  # the explicit max_actors (= min_actors for auto)
    share: float = MIN_SHARE  # CPU share of each `auto` companion actor (resolved later)

    @property
    def res(self) -> StageResources:
        return self.spec.resources

    def cpus(self, n: int | None = None, share: float | None = None) -> float:
        """CPUs of `n` actors (default: those chosen) and their companions, `auto` companions
        at `share` (default: the resolved one)."""
        share = self.share if share is None else share
        return (self.n if n is None else n) * (self.res.num_cpus + sum(
            c.per_actor * (share if c.num_cpus == "auto" else float(c.num_cpus))
            for c in self.spec.companions))

    def gpus(self, n: int | None = None) -> float:
        return (self.n if n is None else n) * (self.res.num_gpus + sum(
            c.per_actor * c.num_gpus for c in self.spec.companions))


def fit_pools(label: str, cfg: T, specs: Sequence[StageSpec], cluster: Cluster | None,
              fixed: Sequence[Fixed] = (), reserve: float = RESERVE_CPUS) -> T:
    """The command's config `cfg` with the `max_actors` of every pool of `specs` (the graph
    built from `cfg`) and the companions' `auto` shares resolved for `cluster`, or a
    ConfigError naming the keys to change. Build the graph again from what it returns.
    `cluster` None (a cluster not joined yet): `cfg` unchanged; call again once Ray runs."""
    if cluster is None:
        return cfg
    keys = config_keys(cfg)
    pools = []
    for s in specs:
        r = s.resources
        auto = r.max_actors == "auto"
        pools.append(_Pool(s, keys.get(id(r), s.name), r.min_actors, auto,
                           r.min_actors if auto else int(r.max_actors)))
    cpus = cluster.cpus - reserve - sum(f.count * f.num_cpus for f in fixed)
    gpus = cluster.gpus - sum(f.count * f.num_gpus for f in fixed)
    if cluster.fixed:  # every pool at min_actors, `auto` companions at their least share
        _check_minimums(label, pools, fixed, cluster, cpus, gpus, reserve)
    _share_companions(pools, cpus)
    notes: list[str] = []
    for p in pools:  # explicit bounds as asked, then shrunk while they do not fit
        if not p.auto:
            p.n = p.asked
    while cluster.fixed and _over(pools, cpus, gpus):
        shrinkable = [p for p in pools if not p.auto and p.n > p.res.min_actors]
        if not shrinkable:  # the minimums fit (checked), so this is rounding: stop
            break
        max(shrinkable, key=lambda p: (p.cpus(), p.gpus())).n -= 1  # the largest first
    cap = max(1, math.floor(cluster.cpus))
    growing = sorted((p for p in pools if p.auto),
                     key=lambda p: -(p.cpus(1) + p.gpus(1)))
    while True:  # auto pools: one more actor each, heaviest first, while it fits
        grew = False
        for p in growing:
            if p.n < cap and (p.cpus(1) > 0 or p.gpus(1) > 0):
                p.n += 1
                if _over(pools, cpus, gpus):
                    p.n -= 1
                else:
                    grew = True
        if not grew:
            break
    for p in pools:
        if not p.auto and p.n < p.asked:
            notes.append(f"{p.key} {p.n} actor{'s' * (p.n > 1)} (asked {p.asked})")
        elif p.auto and p.n > p.res.min_actors:
            notes.append(f"{p.key} up to {p.n} actors (auto)")
        for c in p.spec.companions:
            if c.num_cpus == "auto":
                notes.append(f"{c.name} {p.share:.2g} CPU each (auto)")
    if notes:
        shrunk = any(not p.auto and p.n < p.asked for p in pools)
        why = ", ".join([x.name for x in fixed] + [c.name for p in pools
                                                   for c in p.spec.companions])
        tail = f" to fit {why or 'the other pools'}" if shrunk else ""
        print(f"[{label}] {cluster.cpus:g} CPUs: {', '.join(notes)}{tail}", flush=True)
    for p in pools:
        cfg = with_key(cfg, p.key + ".max_actors", max(p.n, p.res.min_actors))
        for c in p.spec.companions:
            if c.num_cpus == "auto":
                cfg = with_key(cfg, c.key, p.share)
    return cfg


def _over(pools: list[_Pool], cpus: float, gpus: float) -> bool:
    eps = 1e-9
    return (sum(p.cpus() for p in pools) > cpus + eps
            or sum(p.gpus() for p in pools) > gpus + eps)


def _share_companions(pools: list[_Pool], cpus: float) -> None:
    """Resolve `auto` companion shares: an equal share of what the minimums leave, at most 1
    CPU and at least MIN_SHARE (on a fixed cluster the minimums' check holds that room; a
    joined one may grow)."""
    count = sum(p.res.min_actors * c.per_actor for p in pools for c in p.spec.companions
                if c.num_cpus == "auto")
    if not count:
        return
    left = cpus - sum(p.cpus(p.res.min_actors, share=0.0) for p in pools)
    share = max(MIN_SHARE, min(1.0, math.floor(100 * left / count) / 100))
    for p in pools:
        p.share = share


def _check_minimums(label: str, pools: list[_Pool], fixed: Sequence[Fixed], cluster: Cluster,
                    cpus: float, gpus: float, reserve: float) -> None:
    for x in fixed:
        if x.count * x.num_gpus > cluster.gpus:
            raise ConfigError(f"{x.keys[0]}={x.count} x {x.name}.num_gpus={x.num_gpus:g} needs "
                              f"{x.count * x.num_gpus:g} GPUs but the cluster has "
                              f"{cluster.gpus:g}; lower them, or join a cluster with GPUs "
                              "(--address)")
    for p in pools:  # a GPU the machine does not have is no matter of sizing
        if p.res.num_gpus * p.res.min_actors > cluster.gpus:
            raise ConfigError(f"{p.key}.num_gpus={p.res.num_gpus:g} x {p.res.min_actors} "
                              f"actor(s) needs GPUs but the cluster has {cluster.gpus:g}; "
                              f"--set {p.key}.num_gpus=0, or join a cluster with GPUs "
                              "(--address)")
    if _over(pools, cpus, gpus):  # the pools are still at min_actors here
        _refuse(label, pools, fixed, cluster, reserve)


def _refuse(label: str, pools: list[_Pool], fixed: Sequence[Fixed], cluster: Cluster,
            reserve: float) -> None:
    """One line: what the minimums ask, what the cluster has, and `--set` keys that fit."""
    parts = [f"{x.name}: {x.count} x {x.num_cpus:g}" for x in fixed]
    for p in pools:
        parts.append(f"{p.key}: {p.res.min_actors} x {p.res.num_cpus:g}")
        for c in p.spec.companions:
            share = MIN_SHARE if c.num_cpus == "auto" else float(c.num_cpus)
            parts.append(f"{c.name}: {p.res.min_actors * c.per_actor} x {share:g}")
    need = sum(x.count * x.num_cpus for x in fixed) + sum(p.cpus(p.res.min_actors, MIN_SHARE)
                                                          for p in pools)
    fixes = [f"--set {p.key}.min_actors=1" for p in pools if p.res.min_actors > 1]
    budget = cluster.cpus - reserve
    scale = budget / need if need > 0 else 1.0
    if scale < 1:  # every CPU share scaled down together, rounded down to 0.01
        def fit(v: float) -> str:
            return f"{max(0.01, math.floor(100 * v * scale) / 100):g}"
        fixes += [f"--set {x.keys[1]}={fit(x.num_cpus)}" for x in fixed if x.num_cpus > 0]
        fixes += [f"--set {p.key}.num_cpus={fit(p.res.num_cpus)}" for p in pools
                  if p.res.num_cpus > 0]
        fixes += [f"--set {c.key}={fit(MIN_SHARE if c.num_cpus == 'auto' else c.num_cpus)}"
                  for p in pools for c in p.spec.companions]
    raise ConfigError(
        f"{label}: the actor pools need at least {need:g} CPUs ({', '.join(parts)}) but the "
        f"cluster has {cluster.cpus:g}, {reserve:g} of them kept free for Ray Data; "
        f"lower them, e.g. {' '.join(dict.fromkeys(fixes)) or '--set ray.num_cpus=N'}")


def with_key(cfg: Any, key: str, value: Any) -> Any:
    """A copy of dataclass `cfg` with dotted `key` set to `value`."""
    head, _, rest = key.partition(".")
    inner = with_key(getattr(cfg, head), rest, value) if rest else value
    return replace(cfg, **{head: inner})


def check_workers(num_workers: int, num_cpus: float, num_gpus: float, cluster: Cluster) -> None:
    """Refuse more Train workers (or GPUs) than `cluster` holds: Ray would wait forever."""
    if num_workers * num_gpus > cluster.gpus:
        raise ConfigError(f"num_workers={num_workers} x worker.num_gpus={num_gpus:g} needs "
                          f"{num_workers * num_gpus:g} GPUs but the cluster has "
                          f"{cluster.gpus:g}; lower them, or join a cluster with GPUs "
                          "(--address)")
    if num_workers * num_cpus > cluster.cpus:
        raise ConfigError(f"num_workers={num_workers} x worker.num_cpus={num_cpus:g} needs "
                          f"{num_workers * num_cpus:g} CPUs but the cluster has "
                          f"{cluster.cpus:g}; lower num_workers or worker.num_cpus")
