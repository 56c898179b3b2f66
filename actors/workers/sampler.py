"""The DiT sampler a generation stage owns: the Euler loop, and the group of ranks that runs it.

- `sample_video_latents(dit, noise, text, ...)`: Euler steps of rectified flow
  (`models.flow.flow_sigmas` / `euler_step`) with classifier-free guidance, on one process or,
  given a `SamplerMesh`, sequence- and CFG-parallel (actors/workers/sequence_parallel.py).
- `SamplerGroup(model, SamplerConfig(...))`: K * (2 if cfg_parallel else 1) ranks. One rank
  runs in this process, no Ray; more: this process is rank 0 and starts the others as Ray
  actors, which load the same model and join one process group (TCP rendezvous at this node's
  IP, gloo on CPU, NCCL on GPU). The worker logic (`SamplerRank`) is the same in both, as in
  vLLM's executor split. `sample(...)` ships the inputs once (`ray.put`), every rank runs the
  same loop on them, rank 0 returns the latents; `close()` (or `with`) ends the actors.
  What a rank holds is a `RankModel` recipe: tubelet's DiT (`DiTModel`, the default) or a
  diffusers pipeline's transformer (actors/workers/pipeline_sampler.py), run by `run(inputs)`.

Batch invariance: a row gets bitwise the same latents whatever batch it is sampled in. CPU
GEMMs do not give that for free: the per-sample adaLN / timestep Linear layers run as a
(B, D) matmul whose kernel (gemv for B = 1, blocked gemm above) and so rounding depend on B
(measured: ~4e-7 apart, torch 2.13 CPU, even with one thread), and GPU kernels pick tiles by
shape too. So the model runs one sample at a time; for video a sample is thousands of tokens,
enough to fill a device. `SamplerConfig.batch_invariant: false` packs the rows of one call
into each forward instead (within ~1e-6 of one at a time; faster where one video does not fill
the device). `SamplerConfig.cache` skips the blocks after the first on steps where the first
barely moved (actors/workers/step_cache.py). Noise always comes from the caller (drawn from
each row's seed): nothing here draws random numbers, so every rank and every layout sees the
same noise.
Latents come back float32 on CPU; the model runs in `SamplerConfig.dtype` (bf16 on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from actors.workers.sequence_parallel import SamplerMesh, cfg_velocity
from actors.workers.step_cache import StepCache, StepCacheConfig
from models.device import DTYPES, pick_device, torch_dtype
from models.dit import DiT
from models.flow import euler_step, flow_sigmas


class RankModel:
    """What each rank of a group holds and runs, as a picklable recipe (Ray ships it to every
    rank actor): `load` runs once per rank and gives the loaded runner, called per `run` with
    the inputs (the same on every rank) and the rank's mesh; it returns the latents. tubelet's
    DiT is `DiTModel`; a diffusers pipeline's transformer is
    actors/workers/pipeline_sampler.py:PipelineModel."""

    def load(self, device: torch.device, dtype: torch.dtype
             ) -> Callable[[dict[str, Any], SamplerMesh | None], torch.Tensor]:
        raise NotImplementedError


# an export folder, a picklable DiT factory, or another model's recipe
ModelSource = str | Path | Callable[[], DiT] | RankModel


@dataclass
class SamplerConfig:
    sequence_parallel: int = 1  # K ranks per video
    cfg_parallel: bool = False  # x2 ranks: the conditional and unconditional branch at once
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    # Ray CPUs per started rank (and its torch threads, on CPU); "auto": an equal share of
    # what the generate job's pools leave (pipeline/pools.py), 1 where nothing sized it
    num_cpus_per_rank: float | Literal["auto"] = 1.0
    timeout_s: float = 600.0  # a collective waiting longer than this fails the sample
    rank_restarts: int = 2  # a rank actor lost mid-batch: new ranks, the batch again (x this)
    # step caching (actors/workers/step_cache.py; diffusers' FirstBlockCache for pipeline
    # folders): off by default, `--cache` turns it on
    cache: StepCacheConfig = field(default_factory=StepCacheConfig)
    # true: one video per forward, bitwise the same latents whatever the batch (see the module
    # docstring); false: up to `max_batch` rows of one shape and setting in one forward
    batch_invariant: bool = True
    compile: bool = False  # torch.compile each DiT block (per shape); see benchmarks/README.md

    def __post_init__(self) -> None:
        if isinstance(self.cache, dict):  # shipped to a stage as `asdict(SamplerConfig)`
            self.cache = StepCacheConfig(**self.cache)

    @property
    def world_size(self) -> int:
        return self.sequence_parallel * (2 if self.cfg_parallel else 1)

    def validate(self) -> None:
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be >= 1, got {self.sequence_parallel}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.rank_cpus <= 0 or self.timeout_s <= 0:
            raise ValueError("num_cpus_per_rank and timeout_s must be > 0")
        if self.rank_restarts < 0:
            raise ValueError(f"rank_restarts: must be >= 0, got {self.rank_restarts}")
        self.cache.validate()

    @property
    def rank_cpus(self) -> float:
        return 1.0 if self.num_cpus_per_rank == "auto" else float(self.num_cpus_per_rank)

    def torch_device(self) -> torch.device:
        return pick_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return torch_dtype(self.dtype)


@torch.no_grad()
def sample_video_latents(
    dit: DiT,
    noise: torch.Tensor,
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    fps: torch.Tensor | None,
    steps: int,
    shift: float,
    guidance: float,
    neg_text: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    mesh: SamplerMesh | None = None,
    cache: StepCacheConfig | None = None,
    batch_invariant: bool = True,
    skipped: list[int] | None = None,
) -> torch.Tensor:
    """Noise (B, C, T, H, W) -> float32 latents on CPU, one sample at a time (batch
    invariance, see the module docstring) or, with `batch_invariant` False, all B rows in each
    forward (the same latents within float rounding, ~1e-6). text (B, L, text_dim) / text_mask
    (B, L) and fps (B,) condition; neg_text / neg_mask (B, L', text_dim) / (B, L') replace the
    null text of the unconditional branch. With a mesh (every rank of it calls this with the
    same inputs), the velocity is sequence- and CFG-parallel; without, it is the plain model's.
    `cache` (enabled): step caching, one cache per forward's rows (actors/workers/
    step_cache.py); `skipped` receives the steps it skipped, once per row."""
    B = noise.shape[0]
    for name, z in (("text", text), ("text_mask", text_mask), ("fps", fps),
                    ("neg_text", neg_text), ("neg_mask", neg_mask)):
        if z is not None and z.shape[0] != B:
            raise ValueError(f"{name} has {z.shape[0]} rows for {B} noise rows")
    if neg_mask is not None and neg_text is None:
        raise ValueError("neg_mask without neg_text")
    param = next(dit.parameters())
    device, dtype = param.device, param.dtype
    sigmas = flow_sigmas(steps, shift)  # on CPU: the same schedule on every rank and device
    caching = cache is not None and cache.enabled

    def rows(z: torch.Tensor | None, i: slice, float_dtype: torch.dtype | None = None):
        if z is None:
            return None
        z = z[i].to(device)
        return z.to(float_dtype) if float_dtype is not None and z.is_floating_point() else z

    out = []
    for lo in range(0, B, 1 if batch_invariant else B):
        i = slice(lo, lo + 1 if batch_invariant else B)
        x = noise[i].to(device, torch.float32)  # the state stays float32
        n = x.shape[0]
        cond = dict(text=rows(text, i, dtype), text_mask=rows(text_mask, i), fps=rows(fps, i),
                    neg_text=rows(neg_text, i, dtype), neg_mask=rows(neg_mask, i))
        step_cache = StepCache(cache.threshold) if caching else None
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = sigma.expand(n).to(device)
            v = cfg_velocity(dit, x.to(dtype), t, guidance, mesh=mesh, cache=step_cache, **cond)
            x = euler_step(x, v.float(), sigma.to(device), sigma_next.to(device))
        out.append(x.cpu())
        if skipped is not None:
            skipped.extend([step_cache.skipped if step_cache else 0] * n)
    return torch.cat(out)


def load_dit(model: ModelSource) -> DiT:
    if callable(model):
        return model()
    from models.export import load_dit as load_exported_dit
    from models.export import read_export

    return load_exported_dit(read_export(model))  # the DiT's tensors only


class DiTModel(RankModel):
    """tubelet's DiT (an export folder or a factory), sampled by `sample_video_latents`."""

    def __init__(self, source: str | Path | Callable[[], DiT], cfg: SamplerConfig | None = None):
        self.source, self.cfg = source, cfg or SamplerConfig()

    def load(self, device: torch.device, dtype: torch.dtype
             ) -> Callable[[dict[str, Any], SamplerMesh | None], torch.Tensor]:
        dit = load_dit(self.source).to(device, dtype).eval()
        if self.cfg.compile:  # per block, so step caching can still stop after the first
            for block in dit.blocks:
                block.compile(dynamic=False)
        cache, invariant = self.cfg.cache, self.cfg.batch_invariant
        return lambda inputs, mesh: sample_video_latents(
            dit, **inputs, mesh=mesh, cache=cache, batch_invariant=invariant)


class SamplerRank:
    """One rank: its model (loaded once), its process group, the loop. Runs in the owner's
    process (rank 0) or as a Ray actor (`threads` set there: a rank takes no more cores than
    Ray gave it)."""

    def __init__(self, model: ModelSource, cfg: SamplerConfig, threads: int | None = None):
        cfg.validate()
        self.cfg, self.device = cfg, cfg.torch_device()
        # Checked here, where the rank runs, not in validate(): a job's driver (a CPU head
        # node) loads the config of GPU sampler actors.
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("sampler device is cuda but this rank sees no GPU; give the "
                               "sample stage num_gpus, or use device: cpu or auto")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)  # a Ray actor sees only its GPU
        recipe = model if isinstance(model, RankModel) else DiTModel(model, cfg)
        self.model = recipe.load(self.device, cfg.torch_dtype())
        self.mesh: SamplerMesh | None = None

    def join(self, host: str, port: int, rank: int, store: Any = None) -> None:
        """Join the group's process group (rank 0 passes its master store) and build the mesh."""
        cfg = self.cfg
        timeout = timedelta(seconds=cfg.timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, cfg.world_size, is_master=False, timeout=timeout)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=cfg.world_size,
                                timeout=timeout)
        self.mesh = SamplerMesh.build(cfg.sequence_parallel, cfg.cfg_parallel)

    def sample(self, inputs: dict[str, Any], keep: bool = True) -> torch.Tensor | None:
        """The latents (keep), or None: the other ranks' equal rank 0's, no need to ship them."""
        latents = self.model(inputs, self.mesh)
        return latents if keep else None

    def close(self) -> None:
        if self.mesh is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.mesh = None


class RankLost(RuntimeError):
    """A rank actor of the group died mid-sample (SIGKILL, OOM, its node removed)."""


def _dead(actor: Any) -> bool:
    """Whether a rank actor is gone (a no-op call to it fails with an actor error)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=5.0)
        return False
    except RayActorError:
        return True
    except GetTimeoutError:
        return False


class SamplerGroup:
    """K * (2 if cfg_parallel else 1) ranks sampling together; this process is rank 0.

    `model` is an export folder (`models.denoiser.load_exported`; on a cluster, a path every
    node can read), a picklable factory returning the DiT, or another `RankModel`. A Ray Data
    stage owns one group per actor: give that actor the resources of rank 0 (a GPU on CUDA);
    the group asks Ray for `world_size - 1` more ranks of `num_cpus_per_rank` CPUs (and one GPU
    each on CUDA).
    """

    def __init__(self, model: ModelSource, cfg: SamplerConfig):
        cfg.validate()
        self.cfg, self.actors = cfg, []
        world = cfg.world_size
        if world > 1 and dist.is_initialized():
            raise RuntimeError("SamplerGroup with several ranks makes this process's default "
                               "process group, and one already exists here; run it in its own "
                               "process (a Ray Data actor)")
        self.local = SamplerRank(model, cfg)
        self.model, self.lost = model, False
        self._start_ranks()

    def _start_ranks(self) -> None:
        """Start the `world_size - 1` rank actors and make the process group with them."""
        cfg, world = self.cfg, self.cfg.world_size
        if world == 1:
            return
        import ray

        host = ray.util.get_node_ip_address()
        timeout = timedelta(seconds=cfg.timeout_s)
        # port 0: the OS picks a free port, so concurrent groups on one node never collide
        store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        gpus = 1 if cfg.torch_device().type == "cuda" else 0
        actor = ray.remote(SamplerRank).options(num_cpus=cfg.rank_cpus, num_gpus=gpus)
        threads = max(1, int(cfg.rank_cpus))
        self.actors = [actor.remote(self.model, cfg, threads) for _ in range(world - 1)]
        try:
            joins = [a.join.remote(host, store.port, r) for r, a in enumerate(self.actors, 1)]
            self.local.join(host, store.port, 0, store=store)
            ray.get(joins)
        except BaseException:
            self._stop_ranks()
            raise

    def _stop_ranks(self) -> None:
        """Kill the rank actors (no goodbye: one may be dead) and leave the process group."""
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
        self.local.close()

    def _restart_ranks(self, why: BaseException) -> None:
        """A rank died: a new group (fresh actors, a new store and process group), same model
        in this process. What it was sampling is sampled again: the inputs are all in `sample`'s
        arguments and the noise is the row's own, so the result is the one it would have been."""
        print(f"[generate] a sampler rank was lost ({type(why).__name__}); restarting the "
              f"{self.cfg.world_size - 1} rank actor(s) of this group", flush=True)
        self._stop_ranks()
        self._start_ranks()
        self.lost = False

    def sample(self, noise: torch.Tensor, text: torch.Tensor | None,
               text_mask: torch.Tensor | None, fps: torch.Tensor | None, steps: int,
               shift: float, guidance: float, neg_text: torch.Tensor | None = None,
               neg_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`sample_video_latents` on every rank with the same inputs; rank 0's latents."""
        return self.run(dict(noise=noise, text=text, text_mask=text_mask, fps=fps, steps=steps,
                             shift=shift, guidance=guidance, neg_text=neg_text,
                             neg_mask=neg_mask))

    def run(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's runner on every rank with the same `inputs`; rank 0's latents. A rank
        lost mid-run: new ranks, the same inputs again (`rank_restarts` times)."""
        if not self.actors:
            return self.local.sample(inputs)
        for attempt in range(self.cfg.rank_restarts + 1):
            if self.lost:
                self._restart_ranks(self.lost)
            try:
                return self._sample_on_ranks(inputs)
            except RankLost as e:
                self.lost = e.__cause__ or e
                if attempt == self.cfg.rank_restarts:
                    raise RuntimeError(f"sampler ranks lost {attempt + 1} times in one batch "
                                       f"(sampler.rank_restarts={self.cfg.rank_restarts}): "
                                       f"{self.lost}") from e
        raise AssertionError("unreachable")

    def _sample_on_ranks(self, inputs: dict[str, Any]) -> torch.Tensor:
        import ray
        from ray.exceptions import RayActorError

        ref = ray.put(inputs)
        pending = [a.sample.remote(ref, False) for a in self.actors]
        try:
            out = self.local.sample(inputs)
        except Exception as e:
            # A failed rank breaks rank 0's collectives: raise the rank's own error if it has
            # one; a rank that died (its process killed, its node gone) makes a RankLost.
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            for ref_ in ready:
                try:
                    ray.get(ref_)
                except RayActorError as dead:
                    raise RankLost(str(dead)) from dead
            if not ready and any(_dead(a) for a in self.actors):
                raise RankLost(str(e)) from e
            raise
        try:
            ray.get(pending)
        except RayActorError as dead:  # rank 0 has the latents; the group needs new ranks
            self.lost = dead
        return out

    def close(self) -> None:
        if self.actors and not self.lost:
            import ray
            from ray.exceptions import RayActorError

            try:
                ray.get([a.close.remote() for a in self.actors])
            except RayActorError:  # a rank already gone (its owner exiting): nothing to close
                pass
        self._stop_ranks()

    def __enter__(self) -> SamplerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
