"""Few-shot glyph datasets rendered offline from Debian font packages.

The public few-shot benchmarks (miniImageNet, Omniglot, ...) cannot be downloaded on the machines this
project runs on, so this package builds an Omniglot-like substitute from the fonts that Debian packages ship
(see docs/DATA.md for the exact ``apt-get`` line):

* a **class** is one character of one script (``"Latin_a"``, ``"Hangul_U+AC00"``);
* a **sample** is that character drawn by one font face and then given one fixed random "handwriting"
  distortion.

Method (every step is deterministic given the seed and the installed font set):

1. **Faces.**  The font files under the font directories are enumerated in sorted order (``.ttf``,
   ``.otf``, ``.ttc``; symlinks resolved, duplicates removed).  For each script, a face is a candidate only
   if its fontTools ``cmap`` covers every character of the script and it has outlines.  Candidates are put
   in a canonical round-robin order over font families (sorted by family name, then by face).  A face is
   dropped when its family and style names repeat those of a face kept before it (one design shipped as
   both ``.otf`` and ``.ttf``), when one of its glyphs has an empty box or renders no ink, when its glyphs
   all look alike (tofu boxes), or when it renders nearly the same as a face kept before it (mean absolute
   difference of the clean 32x32 renders below ``FACE_MAD`` = 0.02, on at most ``SCREEN_CHARS`` evenly
   spaced characters of the script).
2. **Rendering.**  A glyph is drawn at ``RENDER_PT`` pixels per em with Pillow's basic layout (isolated
   letters need no shaping), cropped to its ink box and padded to a square.
3. **Lookalike classes.**  Only one Latin case is used (lower case), Cherokee is left out, and the
   Katakana that copy a Kanji or Hiragana shape (ka, ro, e, ta, ni, ha, he) are not candidates.  For every
   class the mean of its clean renders over the kept faces is computed; walking the classes in a fixed
   script order, a class is dropped when its mean render is within ``CLASS_MAD`` (mean absolute
   difference, 0.045) of a class of the same script kept earlier, or within ``CROSS_SCRIPT_MAD`` (0.055)
   of a class of another script (a borrowed shape: Latin ``o`` / Cyrillic ``o`` / Greek omicron, ``i`` /
   Arabic alef, ``h`` / Armenian ho, Hiragana / Katakana ``ri``, ...).
4. **Distortion.**  The square glyph is scaled to ``GLYPH_FILL`` of a canvas ``SUPERSAMPLE`` times the
   target size and transformed by one random affine map (rotation +-15 degrees, horizontal shear +-0.3,
   anisotropic scale 0.75-1.05 per axis, shift +-10 % of the image per axis); its strokes are then thinned
   (3x3 minimum filter on the ink; skipped when that would erase more than half of the ink, as for
   hairline faces), kept, or thickened (5x5 maximum filter), one of the three with equal probability;
   finally the canvas is downsampled to the target size with Lanczos and the ink is stretched so that
   the darkest pixel is black (light faces would otherwise give faint grey glyphs).  The parameters of one
   sample come from a numpy ``Generator`` seeded by ``(seed, crc32(class name), sample index)``.
   Sample ``i`` of a class uses face ``i mod F`` of the script's face list, whose order is a seeded shuffle
   of the font families followed by a round-robin, so a class gets as many different families as
   possible; when a script has fewer faces than samples, a face is reused with a different distortion.
5. **Images** are stored as ``uint8`` grey, **dark ink on a white background** (255 = paper), like
   Omniglot.

Two datasets are built from this:

* ``embedded`` -- the pack committed to the repository (``data/glyphs100.npz``): 100 classes drawn
  round-robin over all scripts and split 64 / 16 / 20 *by class* with a seeded random assignment (like
  miniImageNet), 32x32, 60 images per class.
* ``benchmark`` -- about 1,000 classes split *by script* (like Omniglot's background / evaluation split,
  see ``BENCHMARK_SPLITS``), 32x32, 20 images per class, built on demand (``ensure_benchmark``) with a
  manifest of checksums next to it.

File format (one ``.npz``, read by ``data_generator/packs.py``): for each split ``s`` in
``train, val, test``: ``s_images`` uint8 ``(N, H, W)``, ``s_labels`` int64 ``(N,)`` in ``0..C_s-1``,
``s_classes`` unicode ``(C_s,)`` sorted by name, with ``s_classes[label]`` the class of an image; plus
``meta_json``, a 0-d unicode array holding a JSON object (seed, image size, generator version, per-split
counts, faces used, sha256 of every array).  The archive is written with a fixed zip timestamp and
compression level, so the same seed and the same fonts give a byte-identical file.

Command line::

    python -m tools.glyphs embedded --out data/glyphs100.npz --seed 0 --baseline
    python -m tools.glyphs benchmark --out data/glyphs1k --seed 0 --baseline
    python -m tools.glyphs baseline data/glyphs100.npz

Modules: ``fonts`` (scripts, class names, font faces and their coverage), ``render`` (rendering and
distortion), ``pool`` (face selection and the lookalike filter), ``pack`` (packing, checksums, the two
datasets, manifest, ``ensure_benchmark``), ``baseline`` (the raw-pixel baseline on the models' fixed test
episodes), ``cli`` (the command line).  This is an offline tool: the library (``data_generator``) only reads
the packs it writes.
"""

