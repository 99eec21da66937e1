"""``data_generator.folders.scan_images`` (the query folder of ``--phase predict``, ``--phase embed --query``) and the
support folder's messages of ``scan_class_folders``: the skip rules of a dataset split, at any depth."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from data_generator.folders import scan_class_folders, scan_images
from utils.errors import UserError


def _png(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)


def test_every_image_at_any_depth_sorted_with_the_skips_counted(tmp_path, capsys):
    for rel in ("b.png", "a/x.JPG", "a/deep/y.png", "c/z.webp"):
        _png(str(tmp_path / rel))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    _png(str(tmp_path / ".cache" / "w.png"))  # everything under a hidden folder is skipped
    (tmp_path / "empty").mkdir()
    assert scan_images(str(tmp_path)) == ["a/deep/y.png", "a/x.JPG", "b.png", "c/z.webp"]
    out = capsys.readouterr().out.strip()
    assert out == f"skipped 3 file(s) in {tmp_path} that are hidden or not images by extension (first: .cache)"


def test_a_broken_link_is_named_and_a_folder_without_images_is_empty(tmp_path):
    (tmp_path / "none").mkdir()
    assert scan_images(str(tmp_path / "none")) == []
    os.symlink(tmp_path / "gone.png", tmp_path / "none" / "l.png")
    with pytest.raises(UserError, match="l.png is a broken symbolic link"):
        scan_images(str(tmp_path / "none"))
    with pytest.raises(UserError, match="query folder .*nowhere not found"):
        scan_images(str(tmp_path / "nowhere"), what="query folder")


def test_the_support_folder_is_named_with_its_own_layout(tmp_path):
    (tmp_path / "s" / "cat").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        scan_class_folders(str(tmp_path / "s"), layout="<support>/<class>/<image>", what="support folder")
    assert str(e.value) == f"class folder {tmp_path / 's' / 'cat'} is empty (expected layout <support>/<class>/<image>)"
