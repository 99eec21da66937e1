"""Applications built on the library (``utils``, ``models``, ``data_generator``) and the trainer: the speed
benchmark (``python -m tools.benchmark``), the ablation report (``python -m tools.report``) and the offline glyph
dataset builder (``python -m tools.glyphs``). The library never imports this package (``tests/test_layering.py``).
"""
