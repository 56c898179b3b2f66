"""Actor pools sized to the cluster (pipeline/pools.py): `auto` pools take what the cluster
holds, explicit numbers are upper bounds shrunk to fit with one line saying so, and minimums
that cannot fit are refused with `--set` keys that, pasted, make the job fit."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from actors.common.stage import StageResources, StageSpec
from actors.sample import SampleStage
from pipeline.config import ConfigError, load_config
from pipeline.generate import GenerateConfig, generate_stages, inspect_model
from pipeline.pools import Cluster, Fixed, fit_pools, with_key
from pipeline.streams import PreprocessConfig, clip_stages, latent_stages
from tests.exports import write_export, write_vae

ROOT = Path(__file__).resolve().parents[2]
TWO_CPUS = Cluster(2.0, 0, fixed=True)


@pytest.fixture(scope="module")
def generate_graph(tmp_path_factory):
    """cfg -> the generate graph `tubelet generate` runs (a debug export and VAE on disk)."""
    root = tmp_path_factory.mktemp("models")
    export, vae = write_export(root / "export"), write_vae(root / "vae.safetensors")

    def graph(cfg: GenerateConfig) -> list[StageSpec]:
        cfg = replace(cfg, vae=replace(cfg.vae, checkpoint=str(vae)))
        return generate_stages(cfg, inspect_model(export, cfg.vae), root / "out", gpus=False)
    return graph


def shipped(cls, name: str, *overrides: str):
    return load_config(cls, ROOT / "configs" / name, list(overrides))


def total_cpus(cfg, specs) -> float:
    out = 0.0
    for s in specs:
        r = s.resources
        share = sum(c.per_actor * c.num_cpus for c in s.companions)
        out += r.max_actors * (r.num_cpus + share)
    return out


@pytest.mark.parametrize("extra", [[], ["sampler.sequence_parallel=2"],
                                   ["sampler.sequence_parallel=2", "sampler.cfg_parallel=true"]])
def test_shipped_generate_config_fits_two_cpus(extra, generate_graph, capsys):
    cfg = shipped(GenerateConfig, "generate/default.yaml", *extra)
    fitted = fit_pools("generate", cfg, generate_graph(cfg), TWO_CPUS)
    specs = generate_graph(fitted)
    assert all(isinstance(s.resources.max_actors, int) for s in specs)
    assert total_cpus(fitted, specs) <= 2.0 - 0.25 + 1e-9  # Ray Data keeps its reserve
    said = capsys.readouterr().out
    if not extra:  # what the pools leave: a second sampler and a second decoder
        assert fitted.sample.max_actors == 2 and fitted.decode.max_actors == 2
        assert "sample up to 2 actors (auto), decode up to 2 actors (auto)" in said
    else:  # the ranks share what the pools leave
        assert 0.1 <= fitted.sampler.num_cpus_per_rank <= 1.0 and "sampler ranks" in said
        sample = dict(specs[0].kwargs["stages"])[SampleStage]  # text + sample share a process
        assert sample["sampler"]["num_cpus_per_rank"] == \
            fitted.sampler.num_cpus_per_rank  # what the sampler actor starts its ranks with


def test_an_explicit_pool_shrinks_to_fit_with_one_line(generate_graph, capsys):
    cfg = shipped(GenerateConfig, "generate/default.yaml", "sampler.sequence_parallel=2",
                  "sampler.num_cpus_per_rank=0.5", "decode.max_actors=2",
                  "share_processes=false")
    fitted = fit_pools("generate", cfg, generate_graph(cfg), TWO_CPUS)
    assert fitted.decode.max_actors == 1
    assert capsys.readouterr().out.strip() == \
        "[generate] 2 CPUs: decode 1 actor (asked 2) to fit sampler ranks"


def test_explicit_numbers_that_fit_are_kept_and_auto_grows_on_a_big_machine(capsys):
    cfg = shipped(PreprocessConfig, "preprocess/default.yaml", "decode.max_actors=3")
    fitted = fit_pools("preprocess", cfg, latent_stages(cfg, None), Cluster(16, 0, True))
    assert fitted.decode.max_actors == 3  # the user's bound, and it fits
    assert fitted.encode.max_actors > 10  # auto: what the CPUs hold
    used = sum(s.resources.max_actors * s.resources.num_cpus
               for s in latent_stages(fitted, None))
    assert 12 < used <= 16 - 0.25  # never past one actor per CPU per pool
    assert fit_pools("preprocess", fitted, latent_stages(fitted, None),
                     Cluster(16, 0, True)) == fitted  # a second fit changes nothing
    assert "encode up to" in capsys.readouterr().out


def test_gpu_pools_take_the_gpus_and_train_workers_come_first():
    cfg = shipped(PreprocessConfig, "preprocess/default.yaml", "encode.num_gpus=1")
    fitted = fit_pools("preprocess", cfg, latent_stages(cfg, None), Cluster(16, 3, True))
    assert fitted.encode.max_actors == 3
    workers = [Fixed("worker", 2, 4.0, 1.0, ("num_workers", "worker.num_cpus"))]
    fitted = fit_pools("train", cfg, latent_stages(cfg, None), Cluster(16, 3, True), workers)
    assert fitted.encode.max_actors == 1  # two of the three GPUs train
    assert sum(s.resources.max_actors * s.resources.num_cpus
               for s in latent_stages(fitted, None)) <= 16 - 8 - 0.25


def test_a_joined_cluster_keeps_explicit_numbers_and_sizes_auto_from_its_resources():
    cfg = shipped(PreprocessConfig, "preprocess/default.yaml", "decode.max_actors=40")
    fitted = fit_pools("preprocess", cfg, latent_stages(cfg, None), Cluster(4, 0, False))
    assert fitted.decode.max_actors == 40  # it may grow: the user's number stands
    assert fitted.encode.max_actors == 1


def test_minimums_that_cannot_fit_name_keys_that_make_it_fit():
    cfg = shipped(PreprocessConfig, "preprocess/default.yaml", "decode.min_actors=3")
    with pytest.raises(ConfigError) as e:
        fit_pools("preprocess", cfg, latent_stages(cfg, None), TWO_CPUS)
    message = str(e.value)
    assert "\n" not in message and "decode: 3 x 0.5" in message
    pasted = re.findall(r"--set (\S+)=(\S+)", message)
    assert ("decode.min_actors", "1") in pasted
    for key, value in pasted:  # the keys exist, and with them the job fits
        cfg = with_key(cfg, key, type(getattr_path(cfg, key))(value))
    fit_pools("preprocess", cfg, latent_stages(cfg, None), TWO_CPUS)


def test_too_many_ranks_and_too_many_workers_are_refused_with_their_keys(generate_graph):
    cfg = shipped(GenerateConfig, "generate/default.yaml", "sampler.sequence_parallel=16")
    with pytest.raises(ConfigError, match=r"sampler ranks: 15 x 0.1.*"
                                          "--set sampler.num_cpus_per_rank="):
        fit_pools("generate", cfg, generate_graph(cfg), TWO_CPUS)
    pre = shipped(PreprocessConfig, "preprocess/default.yaml")
    workers = [Fixed("worker", 8, 1.0, 0.0, ("num_workers", "worker.num_cpus"))]
    with pytest.raises(ConfigError, match=r"worker: 8 x 1.*--set worker.num_cpus=0.1"):
        fit_pools("train-vae", pre, clip_stages(pre, None), TWO_CPUS, workers)
    with pytest.raises(ConfigError, match=r"num_workers=8 x worker.num_gpus=1"):
        fit_pools("train-vae", pre, clip_stages(pre, None), TWO_CPUS,
                  [Fixed("worker", 8, 0.1, 1.0, ("num_workers", "worker.num_cpus"))])


def test_auto_is_a_config_value_and_must_be_sized_before_a_graph_runs():
    r = StageResources(0.5, max_actors="auto")
    r.validate()
    with pytest.raises(ValueError, match="fit_pools"):
        r.map_batches_kwargs()
    with pytest.raises(ValueError, match="max_actors"):
        StageResources(0.5, min_actors=2, max_actors=1).validate()


def getattr_path(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
