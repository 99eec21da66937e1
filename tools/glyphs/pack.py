"""Packing the glyph datasets: rendering every class of a split, the npz arrays with ``meta_json`` and their
checksums, byte-reproducible writing, the two datasets (``build_embedded``, ``build_benchmark``), the benchmark's
manifest and ``ensure_benchmark``. The format is described in ``tools/glyphs/__init__.py`` and docs/DATA.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import replace
from typing import Sequence

import numpy as np

from tools.glyphs.fonts import BENCHMARK_SPLITS, DEFAULT_FONT_DIRS, RENDER_PT, SCRIPT_ORDER, SPLITS, Face, GlyphClass, \
    scan_faces
from tools.glyphs.pool import ScriptFaces, parallel_map, build_pool, default_workers, sampling_order
from tools.glyphs.render import GLYPH_FILL, ROTATION_DEG, SCALE_RANGE, SHEAR, SHIFT, SUPERSAMPLE, THICK_FILTER, \
    THIN_FILTER, render_class

GENERATOR_VERSION = "1.0"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_LEVEL = 6


# --------------------------------------------------------------------------------------------------
# Packing and checksums
# --------------------------------------------------------------------------------------------------

def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of every data array (everything but ``meta_json``), by name."""
    return {k: array_sha256(v) for k, v in sorted(arrays.items()) if k != "meta_json"}


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` equivalent with a fixed zip date and compression level (byte-reproducible)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, buffer.getvalue(), compresslevel=_ZIP_LEVEL)
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import PIL
    from PIL import features
    try:
        import fontTools
        ft_version = fontTools.version
    except Exception:  # pragma: no cover
        ft_version = "?"
    return {"numpy": np.__version__, "pillow": PIL.__version__,
            "freetype": str(features.version("freetype2")), "fonttools": ft_version}



def _render_task(task: tuple[GlyphClass, list[Face], int, int, int]) -> np.ndarray:
    return render_class(*task)


def _pack(kind: str, seed: int, size: int, per_class: int, splits: dict[str, list[GlyphClass]],
          per_script: dict[str, ScriptFaces], dropped: dict[str, str], log=None,
          workers: int = 1) -> dict[str, np.ndarray]:
    """Render every split (classes in ``workers`` processes) and assemble the npz arrays with ``meta_json``."""
    arrays: dict[str, np.ndarray] = {}
    orders = {s: [replace(f, codepoints=frozenset()) for f in sampling_order(sf.faces, seed, s)]
              for s, sf in per_script.items() if sf.faces}
    used_faces: dict[str, set[str]] = {}
    for split in SPLITS:
        classes = sorted(splits[split], key=lambda c: c.name)
        tasks = [(cls, orders[cls.script][:per_class], per_class, size, seed) for cls in classes]
        for cls, faces, *_ in tasks:
            for face in faces:
                used_faces.setdefault(face.key, set()).add(cls.script)
        rendered = parallel_map(_render_task, tasks, workers, chunksize=8)
        images = np.concatenate(rendered) if rendered else np.empty((0, size, size), np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = np.repeat(np.arange(len(classes), dtype=np.int64), per_class)
        arrays[f"{split}_classes"] = np.array([c.name for c in classes], dtype=np.str_)
        if log:
            log(f"  {split}: {len(classes)} classes x {per_class} images")
    all_faces = {f.key: f for sf in per_script.values() for f in sf.faces}
    meta = {
        "kind": kind,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(size),
        "images_per_class": int(per_class),
        "ink": "dark ink (0) on white background (255), uint8 grey",
        "splits": {s: {"classes": len(splits[s]), "images": len(splits[s]) * per_class,
                       "scripts": sorted({c.script for c in splits[s]}),
                       "classes_per_script": dict(sorted(Counter(c.script for c in splits[s]).items()))}
                   for s in SPLITS},
        "distortion": {"rotation_deg": ROTATION_DEG, "shear": SHEAR, "scale": list(SCALE_RANGE),
                       "shift": SHIFT, "thin_min_filter": THIN_FILTER, "thick_max_filter": THICK_FILTER,
                       "supersample": SUPERSAMPLE, "glyph_fill": GLYPH_FILL, "render_pt": RENDER_PT},
        "faces_per_script": {s: [f.key for f in orders[s][:per_class]] for s in sorted(orders)
                             if any(c.script == s for v in splits.values() for c in v)},
        "faces": [dict(all_faces[k].describe(), scripts=sorted(used_faces[k])) for k in sorted(used_faces)],
        "dropped_lookalikes": dict(sorted(dropped.items())),
        "versions": _versions(),
    }
    return finalize_arrays(arrays, meta)


def finalize_arrays(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """Add ``meta["sha256"]`` (the data arrays' checksums) and store ``meta`` as ``arrays["meta_json"]``."""
    meta = dict(meta, sha256=arrays_sha256(arrays))
    arrays = dict(arrays)
    arrays["meta_json"] = np.array(json.dumps(meta, ensure_ascii=False, sort_keys=True))
    return arrays


def verify_pack(path: str, expected: dict[str, str] | None = None) -> bool:
    """Whether the arrays of ``path`` match ``expected`` sha256s (default: the pack's own ``meta_json``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception:
        return False
    if "meta_json" not in arrays:
        return False
    if expected is None:
        expected = json.loads(str(arrays["meta_json"]))["sha256"]
    return arrays_sha256(arrays) == expected


# --------------------------------------------------------------------------------------------------
# The two datasets
# --------------------------------------------------------------------------------------------------

def _stratified_pick(pool: Sequence[GlyphClass], n: int, rng: np.random.Generator) -> list[GlyphClass]:
    """``n`` classes drawn round-robin over the scripts (script order and classes shuffled by ``rng``)."""
    by_script: dict[str, list[GlyphClass]] = {}
    for cls in pool:
        by_script.setdefault(cls.script, []).append(cls)
    scripts = [sorted(by_script)[i] for i in rng.permutation(len(by_script))]
    queues = {s: [by_script[s][i] for i in rng.permutation(len(by_script[s]))] for s in scripts}
    picked: list[GlyphClass] = []
    depth = 0
    while len(picked) < n:
        progressed = False
        for s in scripts:
            if depth < len(queues[s]) and len(picked) < n:
                picked.append(queues[s][depth])
                progressed = True
        if not progressed:
            raise ValueError(f"only {len(picked)} classes available, {n} asked for")
        depth += 1
    return picked


def _class_pool(font_dirs: Sequence[str], min_faces: int, workers: int, log) -> tuple:
    """Scan the installed faces and build the class pool (lookalikes dropped) shared by both datasets."""
    t0 = time.time()
    faces = scan_faces(font_dirs)
    log(f"scanned {len(faces)} faces in {time.time() - t0:.1f} s")
    pool, per_script, dropped = build_pool(faces, SCRIPT_ORDER, min_faces=min_faces, log=log, workers=workers)
    log(f"class pool: {len(pool)} classes ({len(dropped)} lookalikes dropped)")
    return pool, per_script, dropped


def build_embedded(out: str, seed: int = 0, n_classes: int = 100, split_sizes: Sequence[int] = (64, 16, 20),
                   per_class: int = 60, size: int = 32, font_dirs: Sequence[str] = DEFAULT_FONT_DIRS,
                   min_faces: int = 16, workers: int | None = None, log=print) -> dict:
    """Build the embedded pack: ``n_classes`` classes over all scripts, split by class. Returns meta."""
    if sum(split_sizes) != n_classes:
        raise ValueError(f"split sizes {tuple(split_sizes)} do not add up to {n_classes}")
    t0 = time.time()
    workers = default_workers() if workers is None else workers
    pool, per_script, dropped = _class_pool(font_dirs, min_faces, workers, log)
    rng = np.random.default_rng([int(seed), zlib.crc32(b"embedded")])
    picked = _stratified_pick(pool, n_classes, rng)
    order = rng.permutation(len(picked))
    bounds = np.cumsum([0, *split_sizes])
    splits = {s: [picked[i] for i in order[bounds[k]:bounds[k + 1]]] for k, s in enumerate(SPLITS)}
    picked_names = {c.name for c in picked}
    dropped = {k: v for k, v in dropped.items() if v in picked_names}
    arrays = _pack("embedded", seed, size, per_class, splits, per_script, dropped, log=log, workers=workers)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_npz(out, arrays)
    log(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.1f} s")
    return json.loads(str(arrays["meta_json"]))


def benchmark_paths(path: str) -> tuple[str, str]:
    base = path[:-4] if path.endswith(".npz") else path
    return base + ".npz", base + ".manifest.json"


def build_benchmark(out: str, seed: int = 0, per_class: int = 20, size: int = 32,
                    font_dirs: Sequence[str] = DEFAULT_FONT_DIRS, min_faces: int = 16,
                    workers: int | None = None, log=print) -> dict:
    """Build the benchmark (split by script) as ``<out>.npz`` + ``<out>.manifest.json``. Returns the manifest."""
    npz_path, manifest_path = benchmark_paths(out)
    t0 = time.time()
    workers = default_workers() if workers is None else workers
    pool, per_script, dropped = _class_pool(font_dirs, min_faces, workers, log)
    splits = {s: [c for c in pool if c.script in BENCHMARK_SPLITS[s]] for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            raise RuntimeError(f"no {s} classes: are the font packages of docs/DATA.md installed?")
    arrays = _pack("benchmark", seed, size, per_class, splits, per_script, dropped, log=log, workers=workers)
    manifest = save_with_manifest(npz_path, arrays, build_seconds=time.time() - t0)
    log(f"wrote {npz_path} ({os.path.getsize(npz_path) / 1e6:.2f} MB) and {manifest_path} "
        f"in {time.time() - t0:.1f} s")
    return manifest


def save_with_manifest(path: str, arrays: dict[str, np.ndarray], build_seconds: float | None = None) -> dict:
    """Write ``<path>.npz`` and ``<path>.manifest.json`` (checksums, seed, counts, fonts) from pack arrays.

    ``arrays`` must hold ``meta_json`` (see ``finalize_arrays``).  Returns the manifest.
    """
    npz_path, manifest_path = benchmark_paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    write_npz(npz_path, arrays)
    meta = json.loads(str(arrays["meta_json"]))
    manifest = {
        "kind": meta.get("kind"),
        "generator_version": meta.get("generator_version"),
        "seed": meta.get("seed"),
        "image_size": meta.get("image_size"),
        "images_per_class": meta.get("images_per_class"),
        "npz": os.path.basename(npz_path),
        "npz_sha256": file_sha256(npz_path),
        "arrays_sha256": meta["sha256"],
        "splits": meta.get("splits"),
        "fonts": meta.get("faces", []),
        "versions": meta.get("versions"),
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
    }
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    return manifest


def ensure_benchmark(path: str, seed: int = 0, per_class: int = 20, size: int = 32,
                     font_dirs: Sequence[str] = DEFAULT_FONT_DIRS, min_faces: int = 16,
                     workers: int | None = None, log=print) -> str:
    """Return the benchmark npz at ``path``, building it if missing and rebuilding if it fails its checksum.

    The pack is accepted when its manifest exists, names the same seed, size, images per class and
    generator version, and the sha256 of every array in the npz matches the manifest.
    """
    npz_path, manifest_path = benchmark_paths(path)
    if os.path.exists(npz_path) and os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            same = (manifest.get("kind") == "benchmark" and manifest.get("seed") == seed
                    and manifest.get("image_size") == size
                    and manifest.get("images_per_class") == per_class
                    and manifest.get("generator_version") == GENERATOR_VERSION)
            if same and verify_pack(npz_path, manifest.get("arrays_sha256") or {}):
                log(f"{npz_path}: checksums match {manifest_path}")
                return npz_path
            log(f"{npz_path}: does not match {manifest_path}; rebuilding")
        except (OSError, ValueError) as err:
            log(f"{manifest_path}: unreadable ({err}); rebuilding")
    build_benchmark(npz_path, seed=seed, per_class=per_class, size=size, font_dirs=font_dirs,
                    min_faces=min_faces, workers=workers, log=log)
    return npz_path

