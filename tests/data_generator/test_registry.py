"""The reader registry (data_generator/dataset_loader.py READERS) and the typed split spec.

The claim of docs/ARCHITECTURE.md ("Add a dataset format"): a new format is one Reader subclass plus its line in
READERS, nothing else. ``NpyPerSplit`` below is such a format, written here and nowhere else; registering it (and
only that) makes ``--dataset_dir`` at a folder of it work through ``load_split``, the cache, split hygiene and
``main.py``.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

import main
from data_generator import dataset_loader as dl
from data_generator.dataset_loader import load_split, parse_spec, peek_split, role_spec, split_spec
from data_generator.decoding import fit_array
from data_generator.image_cache import Prepared
from data_generator.reader import SPLITS, Reader, SplitSpec
from tests import format_fakes as F
from tests.helpers import make_folders, make_npz
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


class NpyPerSplit(Reader):
    """A toy format: ``<root>/<split>.npy``, one uint8 array (C, K, h, w, 3) per split: K images of each of C
    classes, named ``<split>-<c>``."""

    kind = "npy"
    title = "npy split files"
    expected = "train.npy val.npy test.npy"

    def detect(self, root):
        try:
            names = os.listdir(root)
        except OSError:
            return []
        return [()] if any(f"{s}.npy" in names for s in SPLITS) else []

    def files(self, spec, quiet=False):
        if not os.path.isfile(os.path.join(spec.path, f"{spec.split}.npy")):
            raise UserError(f"dataset folder {spec.path} (npy): {spec.split}.npy is missing")
        return [f"{spec.split}.npy"]

    def prepare(self, spec, files, stored_size, num_workers):
        data = np.load(os.path.join(spec.path, files[0]), allow_pickle=False)
        c, k = data.shape[:2]
        flat = data.reshape((c * k,) + data.shape[2:])

        def fill(out):
            for i, img in enumerate(flat):
                out[i] = fit_array(img, stored_size)
        return Prepared([f"{spec.split}-{j}" for j in range(c)], np.repeat(np.arange(c), k).astype(np.int64), fill)


def _write_npy_dataset(root: Path, classes=(8, 5, 5), per_class=20, side=20) -> dict:
    """Per split, the (C, K, side, side, 3) array written; distinct random images (no overlap between splits)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    arrays = {}
    for split, c in zip(SPLITS, classes):
        arrays[split] = rng.integers(0, 256, (c, per_class, side, side, 3), dtype=np.uint8)
        np.save(root / f"{split}.npy", arrays[split])
    return arrays


@pytest.fixture()
def registered(monkeypatch):
    """The registry with the toy format appended: the one change a new format needs."""
    monkeypatch.setattr(dl, "READERS", [*dl.READERS, NpyPerSplit()])


def test_an_unregistered_format_is_not_read(tmp_path):
    _write_npy_dataset(tmp_path / "npy")
    with pytest.raises(UserError, match=r"holds no dataset this program reads \(expected one of: class folders"):
        split_spec(str(tmp_path / "npy"), "train")


def test_a_registered_format_loads_through_load_split_and_the_cache(registered, tmp_path, capsys):
    root = tmp_path / "npy"
    arrays = _write_npy_dataset(root)
    cache = str(tmp_path / "cache")
    spec = split_spec(str(root), "val")
    assert spec == SplitSpec(str(root), "npy", "val") and str(spec) == f"{root}#val"
    assert parse_spec(str(spec)) == spec and role_spec(str(root), "val") == spec
    first = load_split(spec, 16, cache)
    # what the reader gave: (C*K, 16, 16, 3), grouped by class, each image converted like a folder image
    want = np.stack([fit_array(img, 16) for img in arrays["val"].reshape((-1, 20, 20, 3))])
    assert first.images.shape == (100, 16, 16, 3) and np.array_equal(np.asarray(first.images), want)
    assert first.labels.dtype == np.int64 and first.labels.tolist() == np.repeat(np.arange(5), 20).tolist()
    assert first.class_names == [f"val-{c}" for c in range(5)] and first.source == f"{root}#val"
    again = load_split(str(spec), 16, cache)  # its printable form, from the verified cache entry
    assert isinstance(again.images, np.memmap) and np.array_equal(np.asarray(again.images), want)
    assert again.class_names == first.class_names and np.array_equal(again.labels, first.labels)
    assert np.array_equal(again.digests, first.digests)
    summary, why = peek_split(spec, 16, cache, "val")  # split hygiene's look: the record, no decoding
    assert why == "" and summary.class_names == first.class_names and np.array_equal(summary.digests, first.digests)
    assert peek_split(spec, 16, None, "val") == (None, "--cache_dir none")  # no listing of names: nothing to compare
    # the registry's messages list it too
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"cifar-100-python/; train.npy val.npy test.npy; see docs/DATA.md\)"):
        split_spec(str(tmp_path / "empty"), "train")
    with pytest.raises(UserError, match=r"npy split files spec .* needs a split"):
        load_split(str(root), 16)


def test_a_registered_format_runs_main_end_to_end(registered, tmp_path, capsys):
    root = tmp_path / "npy"
    _write_npy_dataset(root)
    logs = tmp_path / "logs"
    base = ["--dataset", "custom", "--dataset_dir", str(root), "--log_root", str(logs), "--backbone", "conv4",
            "--image_size", "16", "--preprocess", "paper", "--quiet", "--device", "cpu", "--seed", "1",
            "--num_val_episodes", "4", "--num_test_episodes", "5", "--pre_val_update_step", "2", "--update_step", "2"]
    pre = ["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_batch_size", "40", "--pre_head", "linear",
           "--pre_optimizer", "adam", "--pre_lr", "0.001"]
    assert main.cli(pre + base) == 0
    weights = logs / "pre" / "custom_conv4" / "max_acc.pth"
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(weights)] + base) == 0
    out = capsys.readouterr().out
    assert "note:" not in out  # the test split was compared with the cached train and val entries
    assert len(list((logs / "cache").glob("*.json"))) == 3  # train, val (pre-train), test (meta-eval)


def test_every_builtin_printable_form_reads_back(tmp_path):
    data = F.make_images(classes=(3, 3, 3), per_class=2, size=8)
    roots = {"folders": make_folders(str(tmp_path / "f"), size=8, per_class=2, classes=(3, 3, 3)),
             "npz": make_npz(str(tmp_path / "p.npz"), size=8, per_class=2, classes=(3, 3, 3)),
             "csv": F.write_csv(str(tmp_path / "csv"), data),
             "metaoptnet": F.write_metaoptnet(str(tmp_path / "mo"), data, "FC100"),
             "learn2learn": F.write_learn2learn(str(tmp_path / "l2l"), data),
             "tiered": F.write_tiered(str(tmp_path / "t"), data, "npz"),
             "cifar100": F.write_cifar100(str(tmp_path / "c"), per_class=(2, 1))[0]}
    kinds = set()
    for kind, root in roots.items():
        for split in SPLITS:
            spec = split_spec(root, split, "CIFAR-FS" if kind == "cifar100" else None)
            assert parse_spec(str(spec)) == spec, spec
            assert load_split(str(spec), 8).source == str(spec)
            kinds.add(spec.kind)
    assert kinds == {r.kind for r in dl.READERS}  # every registered reader was exercised


def test_role_flags_resolve_through_the_registry(tmp_path):
    """A role flag at a pack reads that role's split (docs/DATA.md); its printable form names the split it says."""
    pack = make_npz(str(tmp_path / "p.npz"), size=8, per_class=2, classes=(3, 3, 3))
    assert role_spec(pack, "test") == SplitSpec(pack, "npz", "test")
    assert role_spec(f"{pack}#val", "test") == SplitSpec(pack, "npz", "val")
    folders = make_folders(str(tmp_path / "f"), size=8, per_class=2, classes=(3, 3, 3))
    val = os.path.join(folders, "val")
    assert role_spec(val, "test") == SplitSpec(val, "folders", "val")  # one class-folder split, as given
    with pytest.raises(UserError, match=r"dataset pack spec .*p\.npz needs a split: write .*p\.npz#train"):
        load_split(pack, 8)  # load_split itself reads a printable form: a pack needs its split


def test_malformed_printable_forms_are_one_line(tmp_path):
    root = F.write_metaoptnet(str(tmp_path / "mo"), F.make_images(classes=(3, 3, 3), per_class=2, size=8), "FC100")
    with pytest.raises(UserError, match=r"expected <folder>#<kind>:<benchmark>:<split> with kind one of csv, "
                                        r"metaoptnet, learn2learn, tiered, cifar100 and split one of train, val, test"):
        parse_spec(f"{root}#metaoptnet:FC100")
    with pytest.raises(UserError, match=r"benchmark must be one of miniImageNet, FC100, CIFAR-FS for metaoptnet"):
        parse_spec(f"{root}#metaoptnet:tieredImageNet:test")
    assert parse_spec("no/such#folder") == SplitSpec("no/such#folder", "folders", "such#folder")  # '#' in a name


# ------------------------------------------------------------------------------------------------ the import graph
def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``from X import names`` / ``import X`` in ``path`` (lazy ones in functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_data_generator_has_no_cycle_no_private_import_and_a_cache_that_imports_no_reader():
    pkg = ROOT / "data_generator"
    graph = {}
    for f in sorted(pkg.glob("*.py")):
        mod = f"data_generator.{f.stem}"
        deps = _imports(f)
        private = [(m, n) for m, names in deps for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{mod} imports private names {private}"
        graph[mod] = {m for m, _ in deps if m.startswith("data_generator.")}
    # no cycle: a topological order exists
    done: set[str] = set()
    while len(done) < len(graph):
        ready = [m for m in graph if m not in done and graph[m] <= done | {m}]
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        done.update(ready)
    readers = {"data_generator.folders", "data_generator.packs", "data_generator.formats",
               "data_generator.dataset_loader"}
    for base in ("data_generator.image_cache", "data_generator.decoding", "data_generator.reader",
                 "data_generator.hygiene"):
        assert not graph[base] & readers, f"{base} imports a reader or the registry: {graph[base] & readers}"
