"""The write stage (actors/write.py), called on a table without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pds

from actors.common.schema import LATENT_COLUMNS
from actors.vae_encode import VAEEncodeStage
from actors.write import LatentWriter, read_ids
from tests.stages.test_vae_encode import BUCKETS, VAE, decoded


def test_write_stage_writes_the_contract_whole_and_once(dataset, tmp_path):
    latents = VAEEncodeStage(VAE, BUCKETS)(decoded(dataset, 3))
    writer = LatentWriter(str(tmp_path / "latents"))
    stats = writer(latents)
    assert sum(stats.column("clips").to_pylist()) == 3
    writer(latents)  # the same batch again: the same file name, still one copy of each clip
    files = sorted((tmp_path / "latents").glob("*"))
    assert len(files) == 1 and files[0].name.startswith("part-")
    table = pds.dataset(files, format="parquet").to_table()  # plain pyarrow reads it
    assert tuple(table.column_names) == LATENT_COLUMNS
    assert sorted(read_ids(tmp_path / "latents")) == sorted(latents.column("id").to_pylist())
    assert table.column("latent").type.value_type == pa.float16()
