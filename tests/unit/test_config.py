"""Typed config loading: unknown keys, wrong types and impossible values name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from actors.common.buckets import BucketConfig
from pipeline.cli import config_classes
from pipeline.config import CONFIG_DIR, ConfigError, from_dict, load_config, to_dict


@dataclass
class Inner:
    rate: float = 1.0
    kind: Literal["a", "b"] = "a"

    def validate(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")


@dataclass
class Outer:
    name: str = "x"
    steps: int = 3
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 2)])
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, float] = field(default_factory=dict)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, "steps: 5\ninner:\n  rate: 2\nsizes: [[3, 4], [5, 6]]\n")
    cfg = load_config(Outer, path, ["inner.kind=b", "steps=7", "extra.gpu=0.5"])
    assert cfg.steps == 7 and cfg.inner.rate == 2.0 and cfg.inner.kind == "b"
    assert cfg.sizes == [(3, 4), (5, 6)]
    assert cfg.extra == {"gpu": 0.5}
    assert isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg  # the resolved form loads back


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("stepz: 5\n", [], "unknown key 'stepz'"),
        ("", ["inner.ratee=3"], "unknown key 'inner.ratee'"),
        ("steps: five\n", [], "key 'steps': expected int"),
        ("steps: 2.5\n", [], "key 'steps': expected int"),
        ("", ["inner.kind=c"], "key 'inner.kind': expected one of 'a', 'b'"),
        ("", ["inner.rate=-1"], "inner.rate: must be > 0"),
        ("sizes: [[1, 2, 3]]\n", [], "key 'sizes[0]': expected 2 items"),
        ("- 1\n- 2\n", [], "expected a mapping"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, overrides, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    message = str(err.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


def test_malformed_set_is_named():
    with pytest.raises(ConfigError, match="--set 'steps': expected dotted.key=value"):
        load_config(Outer, None, ["steps"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_every_shipped_config_loads():
    classes = config_classes()
    files = sorted(CONFIG_DIR.glob("*/*.yaml"))
    assert files, "no configs shipped"
    for path in files:
        kind = path.parent.name
        assert kind in classes, f"{path}: no config class registered for configs/{kind}/"
        load_config(classes[kind], path)


@dataclass
class WithBuckets:
    name: str = "x"
    buckets: BucketConfig = field(default_factory=BucketConfig)


def test_shared_table_by_name_or_path_and_overrides_into_it(tmp_path):
    default = load_config(BucketConfig, CONFIG_DIR / "buckets" / "default.yaml")
    path = write(tmp_path, "buckets: default\n")
    assert load_config(WithBuckets, path).buckets == default
    table = tmp_path / "mine.yaml"
    table.write_text((CONFIG_DIR / "buckets" / "debug.yaml").read_text())
    other = tmp_path / "by_path.yaml"
    other.write_text(f"buckets: {table}\n")
    assert load_config(WithBuckets, other).buckets == load_config(BucketConfig, table)
    # --set reaches into a named table, and may name another table
    cfg = load_config(WithBuckets, path, ["buckets.target_fps=4"])
    assert cfg.buckets.target_fps == 4.0 and cfg.buckets.resolutions == default.resolutions
    assert load_config(WithBuckets, path, ["buckets=debug"]).buckets.max_clips_per_video == 1
    # the resolved form holds the whole table and loads back without configs/buckets
    assert from_dict(WithBuckets, to_dict(cfg)) == cfg


def test_bad_shared_table_names_its_file_and_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(WithBuckets, write(tmp_path, "buckets: nope\n"))
    assert "key 'buckets': no table 'nope'" in str(err.value) and "default" in str(err.value)
    table = tmp_path / "bad.yaml"
    table.write_text("target_fps: 8\nmax_clips_per_vide: 2\n")
    with pytest.raises(ConfigError, match=f"{table}: unknown key 'max_clips_per_vide'"):
        load_config(WithBuckets, write(tmp_path, f"buckets: {table}\n"))


def test_shipped_configs_name_the_shared_bucket_tables():
    """The bucket table is written once: no config under configs/<command>/ spells one out."""
    for path in sorted(CONFIG_DIR.glob("*/*.yaml")):
        if path.parent.name != "buckets":
            assert "resolutions:" not in path.read_text(), path


def test_configs_cannot_name_python_objects(tmp_path):
    """A YAML tag that would build a Python object (and run code) is not constructed: in a
    config file it is an error naming the file, in --set it stays inert text, refused where
    the key is typed; either way the payload's command never runs."""
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(Outer, write(tmp_path, f"name: {tag}\n"), [])
    assert str(tmp_path / "c.yaml") in str(err.value)
    with pytest.raises(ConfigError, match="key 'steps': expected int"):
        load_config(Outer, None, [f"steps={tag}"])
    assert load_config(Outer, None, [f"name={tag}"]).name == tag  # a plain string
    assert not marker.exists()
