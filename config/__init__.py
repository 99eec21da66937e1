"""The configuration layer, between the library (``utils``, ``data_generator``, ``models``) and the trainers: every
``main.py`` flag with its recipes and presets (``config/options.py``) and the typed settings built from them once
(``config/settings.py``). It may read the library's registries (backbones, BatchNorm modes, few-shot heads) for the
flags' choices; the library never imports it (``tests/test_layering.py``). The map: docs/ARCHITECTURE.md."""
