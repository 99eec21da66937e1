"""Data side of MTL: every data format's reader and their registry (dataset_loader: ``READERS``, ``load_split``), the
decoded-image cache (image_cache), decoding (decoding), split hygiene (hygiene), batched transforms (transforms),
episodes (meta_data_generator).

Import the submodules directly (``from data_generator.dataset_loader import load_split``); this package imports
nothing eagerly, so decoding workers (``decoding.decode_all``) do not pay for importing torch.
"""
