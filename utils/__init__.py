"""The bottom shelf: errors, atomic writes and misc helpers, checkpoint files, devices and AMP, torchrun, the run
lock, safe pickles, the non-finite check. It imports no other package of the repository (`tests/test_layering.py`)."""
