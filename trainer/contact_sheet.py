"""The contact sheet of ``--phase predict`` (``predictions.png``), drawn with Pillow.

From the top: a title line; the support set, one row per class (its name, then up to the row's width of its images,
``+N`` when there are more); the queries in a grid, each with its predicted class and probability under it, a thick
red frame when the probability is below :data:`models.predict.LOW_CONFIDENCE`, and with a labelled query folder the
true class in red under a wrong prediction; with labels, the confusion matrix last (rows: true class, columns:
predicted; each cell's count, shaded by its share of the row). The thumbnails show each image as the model sees it:
decoded, resized and centre-cropped to the stored size, then scaled to :data:`THUMB` pixels.

A large query folder is shown up to :data:`QUERY_MAX` images (the first ones, in the csv's order); the title says
how many of how many. The geometry is :class:`Layout` (``size``, ``query_box``), which :func:`render` draws into;
the tests locate the frames through it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["THUMB", "QUERY_MAX", "COLUMNS", "Layout", "render", "png_bytes", "LOW_FRAME", "OK_FRAME"]

THUMB = 64           # thumbnail side, px
GAP = 8              # between thumbnails
MARGIN = 12
LINE = 16            # one line of text
LABEL_W = 132        # the class-name column of the support rows and the confusion matrix
COLUMNS = 10         # queries per row
CELL = 30            # a confusion-matrix cell
QUERY_MAX = 200      # queries drawn at most
FRAME = 3            # the frame around a query thumbnail
LOW_FRAME = (220, 30, 30)     # low confidence
OK_FRAME = (200, 200, 200)
WRONG_TEXT = (200, 0, 0)
BACKGROUND = (255, 255, 255)


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class Layout:
    """Where everything goes. ``support_counts``: images per support class; ``shown``: queries drawn;
    ``labelled``: whether the confusion matrix (and the true-class line) is drawn."""

    support_counts: tuple[int, ...]
    shown: int
    labelled: bool

    @property
    def way(self) -> int:
        return len(self.support_counts)

    @property
    def cell_h(self) -> int:
        """A query cell: the thumbnail in its frame, two caption lines (three with labels), the gap."""
        return THUMB + 2 * FRAME + (3 if self.labelled else 2) * LINE + GAP

    @property
    def width(self) -> int:
        grid = COLUMNS * (THUMB + 2 * FRAME + GAP) - GAP
        matrix = LABEL_W + self.way * CELL if self.labelled else 0
        return 2 * MARGIN + max(grid, matrix, LABEL_W + 4 * (THUMB + GAP))

    @property
    def per_support_row(self) -> int:
        """Support thumbnails that fit one row beside the class name."""
        return max(1, (self.width - 2 * MARGIN - LABEL_W) // (THUMB + GAP))

    @property
    def support_top(self) -> int:
        return MARGIN + 2 * LINE                     # title, then the "support" heading

    @property
    def query_top(self) -> int:
        return self.support_top + self.way * (THUMB + GAP) + LINE  # the "queries" heading

    @property
    def query_rows(self) -> int:
        return -(-self.shown // COLUMNS)

    @property
    def matrix_top(self) -> int:
        return self.query_top + self.query_rows * self.cell_h + LINE  # the "confusion" heading

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the png."""
        h = self.matrix_top - LINE if not self.labelled else self.matrix_top + LINE + self.way * CELL
        return self.width, h + MARGIN

    def support_box(self, k: int, j: int) -> tuple[int, int]:
        """Top-left corner of the j-th thumbnail of support class k."""
        return MARGIN + LABEL_W + j * (THUMB + GAP), self.support_top + k * (THUMB + GAP)

    def query_box(self, i: int) -> tuple[int, int, int, int]:
        """The i-th query's thumbnail (x0, y0, x1, y1), inside its frame of :data:`FRAME` px."""
        r, c = divmod(i, COLUMNS)
        x0 = MARGIN + c * (THUMB + 2 * FRAME + GAP) + FRAME
        y0 = self.query_top + r * self.cell_h + FRAME
        return x0, y0, x0 + THUMB, y0 + THUMB


def _thumb(img: np.ndarray) -> Image.Image:
    """uint8 (S, S, 3) -> a THUMB x THUMB image (nearest neighbour when enlarging, so small inputs stay sharp)."""
    im = Image.fromarray(np.ascontiguousarray(img), mode="RGB")
    return im.resize((THUMB, THUMB), Image.NEAREST if im.width < THUMB else Image.BILINEAR)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut (with ``...``) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render(title: str, classes: list[str], support: list[np.ndarray], queries: list[dict], n_queries: int,
           confusion: np.ndarray | None, low: float) -> Image.Image:
    """Draw the sheet.

    Args:
        title: the first line.
        classes: (way,) the support's class names, in column order.
        support: per class, its images uint8 ``(k, S, S, 3)``.
        queries: the queries to draw (at most :data:`QUERY_MAX`), each ``{"image": uint8 (S, S, 3), "predicted":
            name, "probability": float, "label": name or None}``.
        n_queries: how many queries there are in all (the title says how many are shown).
        confusion: ``(way, way)`` counts (rows: true class, columns: predicted), or None (no labels).
        low: the probability below which a prediction is framed in red.
    """
    lay = Layout(tuple(len(s) for s in support), len(queries), confusion is not None)
    sheet = Image.new("RGB", lay.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, bold = _font(11), _font(12)
    draw.text((MARGIN, MARGIN), _fit(draw, title, lay.width - 2 * MARGIN, bold), fill=(0, 0, 0), font=bold)
    draw.text((MARGIN, MARGIN + LINE), f"support: {lay.way} classes, {sum(lay.support_counts)} images",
              fill=(0, 0, 0), font=font)
    for k, (name, imgs) in enumerate(zip(classes, support)):
        x, y = MARGIN, lay.support_top + k * (THUMB + GAP)
        draw.text((x, y + THUMB // 2 - 6), _fit(draw, f"{k}: {name}", LABEL_W - GAP, font), fill=(0, 0, 0), font=font)
        fit = lay.per_support_row - (1 if len(imgs) > lay.per_support_row else 0)  # room for "+N"
        for j, img in enumerate(imgs[:fit]):
            sheet.paste(_thumb(img), lay.support_box(k, j))
        if len(imgs) > fit:
            bx, by = lay.support_box(k, fit)
            draw.text((bx + 4, by + THUMB // 2 - 6), f"+{len(imgs) - fit}", fill=(0, 0, 0), font=font)
    shown = f"showing the first {len(queries)} of {n_queries}" if len(queries) < n_queries else f"{n_queries}"
    draw.text((MARGIN, lay.query_top - LINE),
              f"queries: {shown}; red frame: probability < {low:g}" + ("; red line: the true class of a wrong "
                                                                       "prediction" if confusion is not None else ""),
              fill=(0, 0, 0), font=font)
    for i, q in enumerate(queries):
        x0, y0, x1, y1 = lay.query_box(i)
        is_low = q["probability"] < low
        draw.rectangle((x0 - FRAME, y0 - FRAME, x1 + FRAME - 1, y1 + FRAME - 1), fill=LOW_FRAME if is_low else OK_FRAME)
        sheet.paste(_thumb(q["image"]), (x0, y0))
        width = THUMB + 2 * FRAME
        ty = y1 + FRAME + 1
        draw.text((x0 - FRAME, ty), _fit(draw, str(q["predicted"]), width, font), fill=(0, 0, 0), font=font)
        draw.text((x0 - FRAME, ty + LINE), f"p = {q['probability']:.2f}", fill=LOW_FRAME if is_low else (0, 0, 0),
                  font=font)
        if q.get("label") is not None and q["label"] != q["predicted"]:
            draw.text((x0 - FRAME, ty + 2 * LINE), _fit(draw, f"is {q['label']}", width, font), fill=WRONG_TEXT,
                      font=font)
    if confusion is not None:
        top = lay.matrix_top
        draw.text((MARGIN, top - LINE), "confusion matrix: rows = true class, columns = predicted (class numbers as "
                  "in the support rows)", fill=(0, 0, 0), font=font)
        for j in range(lay.way):
            draw.text((MARGIN + LABEL_W + j * CELL + CELL // 3, top), str(j), fill=(0, 0, 0), font=font)
        totals = confusion.sum(1)
        for k in range(lay.way):
            y = top + LINE + k * CELL
            draw.text((MARGIN, y + CELL // 3), _fit(draw, f"{k}: {classes[k]}", LABEL_W - GAP, font), fill=(0, 0, 0),
                      font=font)
            for j in range(lay.way):
                share = confusion[k, j] / totals[k] if totals[k] else 0.0
                shade = int(255 - 180 * share)
                colour = (shade, 255, shade) if k == j else (255, shade, shade)
                x = MARGIN + LABEL_W + j * CELL
                draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=colour, outline=(160, 160, 160))
                draw.text((x + 4, y + CELL // 3), str(int(confusion[k, j])), fill=(0, 0, 0), font=font)
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    """The png file of ``image`` (written by the caller atomically, with the csv and the json)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
