"""Data side of MTL: decoded splits (dataset_loader), batched transforms (transforms), episodes (meta_data_generator).

Import the submodules directly (``from data_generator.dataset_loader import load_split``); this package imports
nothing eagerly, so decoding workers do not pay for importing torch.
"""
