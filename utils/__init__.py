"""Shared helpers: options, misc, checkpoint, gpu_tools, errors."""
