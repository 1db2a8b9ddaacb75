"""Dataset adapters, label maps, cleaning, grouped stratified splits, balancing, pixel cache."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from support.data import SHARED, requires_shared
from support.datasets import btxrd_rows, noise_image, write_btxrd_layout, write_fracture_layout
from support.images import make_other_format, make_png

from orthovision.config import DataSourceConfig, OrthoVisionConfig
from orthovision.datasets import cleaning, sources
from orthovision.datasets.cleaning import PixelCache, clean_and_cache
from orthovision.datasets.loading import (
    CachedImageDataset,
    balanced_sampler,
    class_weights,
    prepare_data,
)
from orthovision.datasets.sources import (
    Sample,
    btxrd_label,
    detect_source,
    iter_btxrd,
    iter_class_folders,
    iter_fracture_xray,
)
from orthovision.datasets.splits import grouped_stratified_split


@pytest.fixture
def cfg(tmp_path: Path) -> OrthoVisionConfig:
    return OrthoVisionConfig.model_validate(
        {"preprocess": {"image_size": 32}, "train": {"cache_dir": str(tmp_path / "cache")}}
    )


# --- label maps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tumor", "benign", "malignant", "expected"),
    [
        ("0", "0", "0", "non-affected"),
        ("1", "1", "0", "tumor-benign"),
        ("1", "0", "1", "tumor-malignant"),
        ("1", "1", "1", None),  # contradicting flags are not guessed
        ("1", "0", "0", None),
        ("0", "1", "0", None),
    ],
)
def test_btxrd_label_table(tumor, benign, malignant, expected):
    assert btxrd_label({"tumor": tumor, "benign": benign, "malignant": malignant}) == expected


@requires_shared
def test_btxrd_adapter_on_the_real_sample(tmp_path: Path):
    rows = btxrd_rows()
    root = write_btxrd_layout(tmp_path / "btxrd", rows)
    samples = list(iter_btxrd(root))
    assert len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        assert sample.path == root / "images" / row["image_id"]
        # The public file has no patient column: the group is the image id.
        assert sample.group == f"btxrd:{row['image_id']}"
        if row["tumor"] == "0":
            assert sample.label == "non-affected"
        else:
            assert sample.label == ("tumor-benign" if row["benign"] == "1" else "tumor-malignant")
    assert {"non-affected", "tumor-malignant"} <= {s.label for s in samples}


def test_btxrd_patient_column_becomes_the_group(tmp_path: Path):
    rows = [
        {
            "image_id": f"IMG{i}.jpeg",
            "patient_id": f"P{i // 2}",
            "tumor": "1",
            "benign": "1",
            "malignant": "0",
        }
        for i in range(4)
    ]
    samples = list(iter_btxrd(write_btxrd_layout(tmp_path, rows)))
    assert [s.group for s in samples] == ["btxrd:P0", "btxrd:P0", "btxrd:P1", "btxrd:P1"]


def test_btxrd_missing_columns_fail_loudly(tmp_path: Path):
    (tmp_path / "dataset.csv").write_text("image_id,tumor\nA.jpeg,0\n")
    with pytest.raises(sources.DatasetFormatError, match="benign"):
        list(iter_btxrd(tmp_path))


def test_fracture_adapter_maps_labels_and_groups(tmp_path: Path):
    root = write_fracture_layout(tmp_path / "fx", groups_per_class=2, per_group=2)
    samples = list(iter_fracture_xray(root))
    assert Counter(s.label for s in samples) == {"fracture": 4, "non-affected": 4}
    assert {s.group for s in samples} == {
        "fracture-xray:fractured-0",
        "fracture-xray:fractured-1",
        "fracture-xray:not_fractured-0",
        "fracture-xray:not_fractured-1",
    }
    assert detect_source(root).kind == "fracture-xray"


def test_class_folders_with_label_map(tmp_path: Path):
    for folder in ("broken", "normal", "tumor-benign", "ignored"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(make_png(noise_image(len(folder))))
    samples = list(iter_class_folders(tmp_path, {"broken": "fracture", "normal": "non-affected"}))
    assert sorted(s.label for s in samples) == ["fracture", "non-affected", "tumor-benign"]
    assert detect_source(tmp_path).kind == "folders"
    with pytest.raises(KeyError):
        list(iter_class_folders(tmp_path, {"broken": "fractur"}))


# --- cleaning and cache ----------------------------------------------------------------


def test_cleaning_drops_undecodable_unsupported_and_duplicates(tmp_path: Path, cfg):
    good = tmp_path / "good.png"
    good.write_bytes(make_png(noise_image(1)))
    dup = tmp_path / "dup.png"
    dup.write_bytes(good.read_bytes())
    gif = tmp_path / "x.gif"
    gif.write_bytes(make_other_format("GIF"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    samples = [
        Sample(p, "fracture", f"g{i}", "t")
        for i, p in enumerate([good, dup, gif, broken, tmp_path / "missing.png"])
    ]
    cache = PixelCache(cfg.train.cache_dir, cfg.preprocess.param_hash())
    kept, pixels, report = clean_and_cache(samples, cfg, cache)
    assert [s.path for s in kept] == [good]
    assert pixels.shape == (1, 1, 32, 32) and pixels.dtype == np.uint8
    reasons = {Path(d["path"]).name: d["reason"] for d in report.dropped}
    assert reasons == {
        "dup.png": "duplicate",
        "x.gif": "unsupported_format",
        "broken.jpg": "undecodable",
        "missing.png": "unreadable",
    }
    assert report.summary()["kept"] == 1
    assert any("x.gif" in line for line in report.lines())


def test_pixel_cache_avoids_a_second_decode(tmp_path: Path, cfg, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(make_png(noise_image(3)))
    sample = [Sample(path, "fracture", "g", "t")]
    cache = PixelCache(cfg.train.cache_dir, cfg.preprocess.param_hash())
    _, first, _ = clean_and_cache(sample, cfg, cache)

    def boom(*_a, **_k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cleaning, "model_pixels", boom)
    _, second, _ = clean_and_cache(sample, cfg, cache)
    np.testing.assert_array_equal(first, second)
    # Another preprocessing hash is another cache: never stale pixels.
    other = PixelCache(cfg.train.cache_dir, "f" * 64)
    assert other.get(hashlib.sha256(path.read_bytes()).hexdigest()) is None


# --- splits ------------------------------------------------------------------------------


def synthetic_samples(n_groups: int = 120, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for g in range(n_groups):
        label = ["fracture", "non-affected", "tumor-benign", "tumor-malignant"][g % 4]
        for i in range(int(rng.integers(1, 12))):
            samples.append(Sample(Path(f"{g}-{i}.png"), label, f"src:{g}", "src"))
    return samples


def assert_no_group_crosses(samples, splits) -> None:
    where: dict[str, set[str]] = {}
    for s, sp in zip(samples, splits, strict=True):
        where.setdefault(s.group, set()).add(sp)
    crossing = {g: sp for g, sp in where.items() if len(sp) > 1}
    assert not crossing, f"groups crossing splits: {list(crossing)[:5]}"


def test_grouped_split_keeps_groups_and_strata():
    samples = synthetic_samples()
    splits = grouped_stratified_split(samples, (0.7, 0.15, 0.15), seed=0)
    assert_no_group_crosses(samples, splits)
    for label in {s.label for s in samples}:
        members = [sp for s, sp in zip(samples, splits, strict=True) if s.label == label]
        share = Counter(members)
        assert set(share) == {"train", "val", "test"}, f"{label} missing a split"
        assert 0.55 < share["train"] / len(members) < 0.85


def test_grouped_split_is_deterministic_by_seed():
    samples = synthetic_samples()
    a = grouped_stratified_split(samples, seed=7)
    assert a == grouped_stratified_split(samples, seed=7)
    assert a != grouped_stratified_split(samples, seed=8)


@requires_shared
def test_no_group_crosses_on_the_real_manifest():
    samples = list(iter_fracture_xray(SHARED / "fracture-xray"))
    splits = grouped_stratified_split(samples, (0.7, 0.15, 0.15), seed=0)
    assert_no_group_crosses(samples, splits)
    counts = Counter(splits)
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    # The real number of independent radiographs is ~450 groups (data README).
    assert len({s.group for s in samples}) > 400


# --- balancing and dataset ---------------------------------------------------------------


def test_class_weights_inverse_frequency_and_absent_classes():
    w = class_weights([0, 0, 0, 1])
    assert w[2] == 0 and w[3] == 0
    assert w[1] / w[0] == pytest.approx(3.0)
    assert float((w[:2] * torch.tensor([3, 1])).sum()) == pytest.approx(4.0)


def test_balanced_sampler_draws_classes_evenly():
    targets = [0] * 90 + [1] * 10
    sampler = balanced_sampler(targets, seed=0)
    weights = sampler.weights.numpy()
    assert weights[0] * 90 == pytest.approx(weights[-1] * 10)
    draws = [targets[i] for i in list(sampler) * 20]
    assert 0.4 < np.mean(draws) < 0.6
    assert list(balanced_sampler(targets, seed=1)) == list(balanced_sampler(targets, seed=1))


def test_group_balanced_sampler_weighs_each_group_equally_within_its_class():
    # class 0: group "a" kept as 8 copies, group "b" once; class 1: one group of 3
    targets = [0] * 9 + [1] * 3
    groups = ["a"] * 8 + ["b"] + ["c"] * 3
    w = balanced_sampler(targets, seed=0, groups=groups).weights.numpy()
    assert w[:8].sum() == pytest.approx(w[8])  # the 8 copies together weigh one radiograph
    assert w[:9].sum() == pytest.approx(w[9:].sum())  # classes still drawn equally
    plain = balanced_sampler(targets, seed=0).weights.numpy()
    assert plain[0] == pytest.approx(plain[8])  # without groups every copy counts
    with pytest.raises(ValueError, match="differ in length"):
        balanced_sampler(targets, groups=groups[:-1])


def test_cached_dataset_yields_uint8_and_applies_transform():
    pixels = np.zeros((3, 1, 8, 8), np.uint8)
    ds = CachedImageDataset(pixels, [0, 1, 1], transform=lambda x: x + 1)
    x, y = ds[1]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and int(x.max()) == 1 and y == 1


def test_prepare_data_combines_sources_into_four_classes(tmp_path: Path, cfg):
    fx = write_fracture_layout(tmp_path / "fx")
    rows = [
        {"image_id": f"IMG{i:03d}.jpeg", "tumor": t, "benign": b, "malignant": m}
        for i, (t, b, m) in enumerate([("1", "1", "0"), ("1", "0", "1"), ("0", "0", "0")] * 8)
    ]
    bt = write_btxrd_layout(tmp_path / "bt", rows)
    sources = (
        DataSourceConfig(kind="fracture-xray", path=str(fx)),
        DataSourceConfig(kind="btxrd", path=str(bt)),
    )
    prepared = prepare_data(cfg, sources)
    assert set(s.label for s in prepared.samples) == {
        "fracture",
        "non-affected",
        "tumor-benign",
        "tumor-malignant",
    }
    assert_no_group_crosses(prepared.samples, prepared.splits)
    summary = prepared.summary()
    assert [d["licence"] for d in summary["datasets"]][0] == "ODC-By 1.0"
    assert summary["split"]["splits"]["train"]["groups"] > 0
    assert prepared.pixels.shape[0] == len(prepared.samples)
