"""Every stage of every graph, from the same spec lists the commands run (no hand-kept list):
each stage reads only columns its source or an earlier stage provides, names each missing
column in one MissingColumns line before any work, and writes what it declares (the graphs run
in this process on real videos and prompts, stage by stage)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from actors.common.schema import MissingColumns
from actors.common.stage import StageSpec
from actors.common.vae import VAEStageConfig
from actors.workers.train_data import TrainDataConfig
from pipeline.eval import EvalConfig, eval_stages
from pipeline.eval_vae import EvalVAEConfig, eval_vae_stages
from pipeline.generate import GenerateConfig, generate_stages, inspect_model
from pipeline.preprocess import preprocess_stages
from pipeline.prompts import Defaults, read_prompts
from pipeline.sources import SOURCE_SCHEMA, list_sources
from pipeline.streams import PreprocessConfig, clip_stages
from pipeline.train import TrainConfig, loader_stages
from tests.exports import write_export, write_vae

PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return write_vae(root / "vae.safetensors"), write_export(root / "export")


def generate_config(vae: Path) -> GenerateConfig:
    return GenerateConfig(vae=VAEStageConfig(checkpoint=str(vae), device="cpu"),
                          defaults=Defaults(height=32, width=48, frames=5, steps=2))


def graphs(models, tmp_path: Path) -> dict[str, tuple[set[str], list[StageSpec]]]:
    """{graph: (its source rows' columns, its stages)} for every graph a command runs."""
    vae, export = models
    pre = PreprocessConfig(vae=VAEStageConfig(checkpoint=str(vae)))
    gen = generate_config(vae)
    model = inspect_model(export, gen.vae)
    prompt_columns = set(read_prompts(prompt_file(tmp_path), gen.defaults, model.grid)[0])
    index = pa.table({"id": ["a"], "bucket": ["b"], "latent_shape": [[4, 1, 2, 2]],
                      "file": ["a.parquet"], "row": [0]})
    sources = set(SOURCE_SCHEMA.names)
    return {
        "preprocess": (sources, preprocess_stages(pre, tmp_path / "pre")),
        "preprocess (fused decode)": (sources, preprocess_stages(
            replace(pre, fuse_decode=True), tmp_path / "fused")),
        "train-vae": (sources, clip_stages(pre, tmp_path / "errors")),
        "eval-vae": (sources, eval_vae_stages(EvalVAEConfig(checkpoint=str(vae)), str(vae),
                                              tmp_path / "eval-vae")),
        "generate": (prompt_columns | {"checkpoint", "checkpoint_digest"},
                     generate_stages(gen, model, tmp_path / "gen", gpus=False)),
        "generate (shared processes)": (
            prompt_columns | {"checkpoint", "checkpoint_digest"},
            generate_stages(replace(gen, share_processes=True), model, tmp_path / "shared",
                            gpus=False)),
        "eval": ({"path", "prompt", "set", "color", "shape", "direction"},
                 eval_stages(EvalConfig(), tmp_path / "eval")),
        "train --data": ({"step"}, loader_stages(
            replace(TrainConfig(), data=TrainDataConfig(batch_size=1), num_workers=1), index,
            rank=0)),
    }


def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPT + "\n")
    return path


def test_each_stage_reads_what_comes_before_it(models, tmp_path):
    for graph, (columns, specs) in graphs(models, tmp_path).items():
        available = set(columns)
        for spec in specs:
            missing = set(spec.reads) - available
            assert not missing, f"{graph}: {spec.name} reads {sorted(missing)}, which nothing " \
                                "before it provides"
            available = (available - set(getattr(spec.cls, "DROPS", ()))) | set(spec.writes)


def test_every_stage_names_each_missing_column(models, tmp_path):
    seen = set()
    for _, specs in graphs(models, tmp_path).values():
        for spec in specs:
            if spec.cls in seen:
                continue
            seen.add(spec.cls)
            stage = spec.build()
            for column in spec.reads:
                table = pa.table({c: [None] for c in spec.reads if c != column} or {"x": [1]})
                with pytest.raises(MissingColumns, match=rf"^\w[\w +]*: .*'{column}'"):
                    stage(table)
    assert len(seen) >= 13  # probe, assign, decode, encode, decode+encode, write, VAE eval,
    # text, sample, VAE decode, mp4 encode, video eval, plan loader


def run_checking_writes(table: pa.Table, specs: list[StageSpec]) -> pa.Table:
    for spec in specs:
        table = spec.build()(table)
        assert set(spec.writes) <= set(table.column_names), spec.name
        assert table.num_rows, f"{spec.name} gave no rows"
    return table


def test_the_graphs_write_what_they_declare(models, dataset, tmp_path):
    """preprocess and eval-vae on two real videos, generate on a prompt, eval on its video."""
    vae, export = models
    folder, _ = dataset
    sources = list_sources(str(folder)).slice(0, 2)
    pre = PreprocessConfig(vae=VAEStageConfig(checkpoint=str(vae)))
    written = run_checking_writes(sources, preprocess_stages(pre, tmp_path / "pre"))
    assert sum(written.column("clips").to_pylist()) >= 2
    run_checking_writes(sources, eval_vae_stages(EvalVAEConfig(checkpoint=str(vae)), str(vae),
                                                 tmp_path / "eval-vae"))
    gen = generate_config(vae)
    model = inspect_model(export, gen.vae)
    rows = read_prompts(prompt_file(tmp_path), gen.defaults, model.grid)
    out = tmp_path / "gen"
    made = run_checking_writes(pa.Table.from_pylist(rows),
                               generate_stages(gen, model, out, gpus=False))
    shared = run_checking_writes(pa.Table.from_pylist(rows), generate_stages(
        replace(gen, share_processes=True), model, tmp_path / "shared", gpus=False))
    assert shared.column_names == made.column_names
    assert (out / made.column("file")[0].as_py()).stat().st_size > 0
    videos = pa.table({"path": [str(out / made.column("file")[0].as_py())], "prompt": [PROMPT],
                       "set": ["generated"], "color": ["red"], "shape": ["circle"],
                       "direction": ["right"]})
    run_checking_writes(videos, eval_stages(EvalConfig(), tmp_path / "eval"))
