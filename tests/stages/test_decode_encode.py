"""The fused decode + VAE encode stage, called on a table without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pds

from actors.common.buckets import BucketConfig
from actors.common.vae import VAEStageConfig
from actors.decode import DecodeStage
from actors.decode_encode import DecodeEncodeStage
from actors.vae_encode import VAEEncodeStage
from tests.stages.test_decode import plan_rows


def test_fused_stage_equals_decode_then_encode_and_keeps_error_stages(dataset, bad_files,
                                                                      tmp_path):
    root, rows = dataset
    plans = plan_rows(root, rows[:3])
    # a clip plan naming a corrupt file fails at decode; the good rows go on
    broken = {**plans[0], "path": str(bad_files["corrupt"]), "id": "broken"}
    table = pa.Table.from_pylist([plans[0], broken, *plans[1:]])
    vae, buckets = VAEStageConfig(preset="debug"), BucketConfig(target_fps=8.0)
    fused = DecodeEncodeStage(vae, buckets, str(tmp_path / "fused"), threads=1)(table)
    two = VAEEncodeStage(vae, buckets, str(tmp_path / "two"))(
        DecodeStage(str(tmp_path / "two"), threads=1)(table))
    assert fused.column("id").to_pylist() == [p["id"] for p in plans]
    assert fused.select(["id", "latent", "latent_shape"]).equals(
        two.select(["id", "latent", "latent_shape"]))
    assert "frames" not in fused.column_names
    assert set(DecodeEncodeStage.WRITES) <= set(fused.column_names)
    errors = pds.dataset(tmp_path / "fused", format="parquet").to_table().to_pylist()
    assert [(e["path"], e["stage"]) for e in errors] == [(str(bad_files["corrupt"]), "decode")]
