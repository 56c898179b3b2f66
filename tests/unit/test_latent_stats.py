"""Refitting a VAE file's normalisation per channel on latents it made (pipeline.latent_stats):
the refitted file encodes those clips to mean 0 / std 1 in every channel and decodes them to
the same pixels."""

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.vae import load_vae
from pipeline.latent_stats import main
from tests.exports import write_vae


def test_refit_gives_unit_latents_per_channel_and_the_same_pixels(tmp_path, capsys):
    vae_path = write_vae(tmp_path / "vae.safetensors", scaling_factor=0.8, shift_factor=0.1)
    vae = load_vae(vae_path)
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(6, 3, 5, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        z = vae.encode(videos)  # (6, 4, 2, 2, 2) with the old normalisation
    rows = [{"latent": v.flatten().tolist(), "latent_shape": list(v.shape)} for v in z]
    (tmp_path / "latents").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "latents" / "part-0.parquet")
    out = tmp_path / "refit.safetensors"
    assert main(["--vae", str(vae_path), "--latents", str(tmp_path / "latents"),
                 "--output", str(out)]) == 0
    new = load_vae(out)
    assert len(new.config.scaling_factor) == 4
    with torch.no_grad():
        z2 = new.encode(videos)
        torch.testing.assert_close(new.decode(z2), vae.decode(z), atol=1e-4, rtol=0)
    per_channel = z2.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(4), atol=1e-3,
                               rtol=0)
    # --global on a per-channel VAE stays per channel (its channels' scales already differ):
    # one mean / std over all channels of the data, composed with each channel's own
    rows = [{"latent": v.flatten().tolist(), "latent_shape": list(v.shape)} for v in z2]
    (tmp_path / "refitted").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "refitted" / "part-0.parquet")
    again = tmp_path / "global.safetensors"
    assert main(["--vae", str(out), "--latents", str(tmp_path / "refitted"), "--output",
                 str(again), "--global"]) == 0
    with torch.no_grad():
        z3 = load_vae(again).encode(videos)
    torch.testing.assert_close(z3, z2, atol=1e-3, rtol=0)  # z2 is already mean 0, std 1
    # a dataset of another channel count: one line, exit 2
    bad = [{"latent": [0.0] * 8, "latent_shape": [8, 1, 1, 1]}]
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad" / "part-0.parquet")
    assert main(["--vae", str(vae_path), "--latents", str(tmp_path / "bad"),
                 "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "8-channel latents" in capsys.readouterr().out
