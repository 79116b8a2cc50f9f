"""Groups too large to cut never empty a split silently: a split asked for but left empty is
refused with what to change, and fractions missed by more than 2 points are said in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtrain.errors import DataError
from dtrain.prepare import PrepareConfig, prepare


def write_images(root: Path, copies: int, distinct: int) -> Path:
    """Per class: `copies` brightness-shifted copies of one scan (one near-duplicate group) and
    `distinct` unrelated images (a group each)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        scan = rng.integers(0, 200, (32, 32), dtype=np.uint8)
        for i in range(copies):
            Image.fromarray(scan + i % 5).save(root / c / f"copy{i:03d}.png")
        for i in range(distinct):
            image = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(image).save(root / c / f"other{i:03d}.png")
    return root


def test_a_split_emptied_by_one_huge_group_is_refused_with_what_to_change(tmp_path):
    source = write_images(tmp_path / "img", copies=30, distinct=2)
    config = PrepareConfig(source=str(source), out=str(tmp_path / "ds"), progress=False)
    with pytest.raises(DataError, match=r"left val empty .*largest group holds 30 of 64 images"):
        prepare(config)
    assert not (tmp_path / "ds").exists()
    match = "--dedup-distance"
    with pytest.raises(DataError, match=match):
        prepare(config)


def test_fractions_missed_by_large_groups_are_said_in_one_line(tmp_path, capsys):
    source = write_images(tmp_path / "img", copies=40, distinct=12)
    out = prepare(PrepareConfig(source=str(source), out=str(tmp_path / "ds"), progress=False))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning: split" in line]
    assert len(warnings) == 1 and "0.7,0.1,0.2 was asked" in warnings[0]
    assert "largest group holds 40 of 104 images" in warnings[0]
    assert (out / "dataset.json").is_file()  # said, not refused: every split has images
