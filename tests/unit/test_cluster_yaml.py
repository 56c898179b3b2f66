"""cluster.yaml is a real cluster-launcher file whose node types can host what configs ask for."""

import dataclasses
from pathlib import Path

import yaml

from pipeline.cli import config_classes
from pipeline.config import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[2]


def requests(cfg, where=""):
    """Every (where, {CPU, GPU}) a config requests: dataclasses with num_cpus / num_gpus."""
    if not dataclasses.is_dataclass(cfg):
        return
    names = {f.name for f in dataclasses.fields(cfg)}
    if {"num_cpus", "num_gpus"} <= names:
        yield where, {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus}
    for f in dataclasses.fields(cfg):
        yield from requests(getattr(cfg, f.name), f"{where}.{f.name}")


def test_cluster_yaml_node_types():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "setup_commands", "file_mounts"):
        assert key in cluster
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert {"cpu_decode", "gpu_vae", "gpu_train"} <= set(types)
    assert types["cpu_decode"]["resources"].get("GPU", 0) == 0
    assert types["gpu_vae"]["resources"]["GPU"] >= 1
    assert types["gpu_train"]["resources"]["GPU"] >= 2
    for name, node in types.items():
        assert node["resources"]["CPU"] > 0, name
        assert "InstanceType" in node["node_config"], name
    assert any("make setup" in c for c in cluster["setup_commands"])


def test_every_config_request_fits_a_node_type():
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    classes = config_classes()
    for path in sorted(CONFIG_DIR.glob("*/*.yaml")):
        cfg = load_config(classes[path.parent.name], path)
        for where, req in requests(cfg):
            fits = [n for n, t in types.items()
                    if all(t["resources"].get(k, 0) >= v for k, v in req.items())]
            assert fits, f"{path}{where} requests {req}; no node type in cluster.yaml has it"


def test_cluster_keeps_the_dashboard_private_and_uses_token_auth():
    """Issue 13: the job server is not on a public interface; every node authenticates."""
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
