"""``python -m tools.glyphs ...``: see ``tools.glyphs.cli``."""
import sys

from tools.glyphs.cli import cli

sys.exit(cli())
