"""Every stage checks the columns it declares in READS: a table without one of them is one
MissingColumns line naming the stage and the column, before any work."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from actors.assign import AssignStage
from actors.common.buckets import BucketConfig
from actors.common.schema import MissingColumns
from actors.common.vae import VAEStageConfig
from actors.decode import DecodeStage
from actors.decode_encode import DecodeEncodeStage
from actors.patchify import PatchifyStage
from actors.probe import ProbeStage
from actors.vae_encode import VAEEncodeStage
from actors.vae_eval import VAEEvalStage
from actors.workers.train_data import PlanLoader, TrainDataConfig
from actors.write import LatentWriter
from models.vae import build_vae, save_vae


def stages(tmp_path) -> dict[str, object]:
    torch.manual_seed(0)
    save_vae(build_vae("debug"), tmp_path / "vae.safetensors")
    vae, buckets = VAEStageConfig(preset="debug"), BucketConfig()
    return {
        "probe": ProbeStage(),
        "bucket": AssignStage(buckets),
        "decode": DecodeStage(),
        "VAE encode": VAEEncodeStage(vae, buckets),
        "decode+encode": DecodeEncodeStage(vae, buckets),
        "write": LatentWriter(str(tmp_path / "latents")),
        "patchify": PatchifyStage(),
        "VAE eval": VAEEvalStage(str(tmp_path / "vae.safetensors"), buckets),
        "PlanLoader": PlanLoader(pa.table({"id": ["a"], "bucket": ["b"],
                                           "latent_shape": [[4, 1, 2, 2]],
                                           "file": ["a.parquet"], "row": [0]}),
                                 TrainDataConfig(batch_size=1), world_size=1, rank=0),
    }


def test_every_stage_names_each_missing_column(tmp_path):
    for name, stage in stages(tmp_path).items():
        reads = type(stage).READS
        assert reads, name
        for column in reads:
            table = pa.table({c: [None] for c in reads if c != column} or {"x": [1]})
            label = "decode" if name == "decode+encode" else name  # the decode half checks
            with pytest.raises(MissingColumns, match=rf"^{label}: .*'{column}'"):
                stage(table)
