"""``python -m tools.glyphs ...``: see ``tools.glyphs.cli``."""
import sys

from tools.glyphs.cli import _cli

sys.exit(_cli())
