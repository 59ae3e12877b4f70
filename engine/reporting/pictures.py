"""Pictures that stand on their own: tiles of images and maps, each titled, with a colour bar or a legend.

Every picture of the project (the tokenizer's token maps, MIM's attention maps, the demo report's token ids) is a
grid of groups of square tiles, e.g. (input | token map) or (input | head mean | head 1 ...). Here they are laid
out in pixels and drawn with matplotlib (Agg, no display) into a uint8 RGB array, for tensorboard's `add_image`
or a PNG:

- a tile is at least `TILE` pixels a side: small images and maps are upsampled by nearest neighbour (an integer
  factor where the sizes allow), so every pixel and every patch stays a sharp square;
- each tile has its title above it, the picture a title on top and an optional note under it;
- a colour bar (for maps drawn with a colour map) or a legend (swatches and labels) sits right of the tiles;
- the grid is sized to the groups: `columns` at most per row, balanced over the rows (7 groups at most 4 a row
  are 4 + 3), and only real tiles are drawn, never blank padding.

Tiles are placed unresampled at whole-pixel offsets (`Figure.figimage`), so a tile's pixels in the picture are
exactly the array given; `Picture.tiles` says where each one is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TILE", "ColourBar", "Legend", "Picture", "Tile", "balanced_columns", "nearest", "render", "save_png",
           "tile_side"]

TILE = 224          # the smallest side of a tile, in pixels
DPI = 100           # pixels per inch of the figure: sizes below are in pixels
MARGIN = 12
GROUP_GAP = 24      # between groups of a row
TILE_GAP = 6        # between the tiles of a group
ROW_GAP = 14
TITLE_PT, TILE_TITLE_PT, NOTE_PT = 12, 9, 8
LINE_PX = {12: 18, 9: 14, 8: 12}   # line height of each font size


@dataclass
class Tile:
    """One square of the picture: `pixels` (uint8 `[h, w, 3]`, or `[h, w]` grey, already at its size) and the `title`
    above it; `marks`: text drawn over the tile, `(x, y, text, colour)` in the tile's pixels (e.g. an id per patch)."""
    pixels: np.ndarray
    title: str
    marks: tuple = ()


@dataclass
class ColourBar:
    """The scale of the maps drawn with colour map `cmap` (a matplotlib name or Colormap) from `vmin` to `vmax`."""
    cmap: object
    vmin: float
    vmax: float
    label: str
    ticks: list | None = None


@dataclass
class Legend:
    """Colour swatches (uint8 RGB) with a label each, under a `title`."""
    title: str
    entries: list = field(default_factory=list)   # [(rgb, label)]


@dataclass
class Picture:
    """A rendered picture: `image` uint8 `[H, W, 3]`; `tiles[i]` = `(top, left, height, width)` of the i-th tile
    (groups in order, tiles within a group in order); `key`: the same for the colour bar or legend (None without)."""
    image: np.ndarray
    tiles: list
    key: tuple | None


def tile_side(side: int, least: int = TILE) -> int:
    """The tile size for an image of `side` pixels: the smallest whole multiple of `side` that is >= `least`."""
    return side * max(1, math.ceil(least / side))


def nearest(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """`image` (`[h, w]` or `[h, w, c]`) resized to `height` x `width` by nearest neighbour: an integer factor
    repeats each pixel as a square; otherwise each output pixel takes the input pixel under its top-left corner."""
    width = height if width is None else width
    h, w = image.shape[:2]
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return image[rows][:, cols]


def balanced_columns(count: int, most: int) -> int:
    """Groups per row for `count` groups, `most` at most: as few rows as `most` allows, filled evenly, so the last
    row is short by less than one group per row (7 at most 4: 4 + 3, not 4 + 4 with an empty cell)."""
    if count < 1:
        raise ValueError("a picture needs at least one tile")
    rows = math.ceil(count / max(1, most))
    return math.ceil(count / rows)


def _wrap(text: str, width_px: float, pt: int, bold: bool = False) -> list[str]:
    """`text` broken into lines (at its newlines, then between words) that are at most `width_px` wide when drawn at
    `pt` points, measured by Agg itself."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    renderer, font = RendererAgg(1, 1, DPI), FontProperties(size=pt, weight="bold" if bold else "normal")

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0] <= width_px

    lines = []
    for part in text.split("\n"):
        line = ""
        for word in part.split(" "):
            if line and not fits(f"{line} {word}"):
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def render(groups: list[list[Tile]], columns: int, title: str, key: ColourBar | Legend | None = None,
           note: str = "") -> Picture:
    """Lay out and draw `groups` of tiles, `columns` groups at most per row (`balanced_columns`).

    Args:
        groups: each a list of tiles drawn side by side (e.g. an input and its map); tiles of a row share a height.
        columns: the most groups in one row.
        title: the picture's title, on top.
        key: a colour bar or a legend, right of the tiles.
        note: a line or two under the tiles (how to read the colours).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_row = balanced_columns(len(groups), columns)
    rows = [groups[i:i + per_row] for i in range(0, len(groups), per_row)]
    row_widths = [sum(sum(t.pixels.shape[1] for t in g) + TILE_GAP * (len(g) - 1) for g in row)
                  + GROUP_GAP * (len(row) - 1) for row in rows]
    tiles_w = max(row_widths)
    key_w = 0 if key is None else (110 if isinstance(key, ColourBar) else 230)
    width = MARGIN + tiles_w + (GROUP_GAP + key_w if key is not None else 0) + MARGIN
    title_lines = _wrap(title, width - 2 * MARGIN, TITLE_PT, bold=True)
    note_lines = _wrap(note, width - 2 * MARGIN, NOTE_PT) if note else []

    # Vertical layout: title, then per row the tile titles and the tiles, then the note.
    y = MARGIN + LINE_PX[TITLE_PT] * len(title_lines) + 6
    placed, texts = [], []   # (top, left, tile), (x, y, text, pt, colour, ha, va)
    tiles_top = y
    for row in rows:
        wrapped = [[_wrap(t.title, t.pixels.shape[1], TILE_TITLE_PT) for t in g] for g in row]
        title_h = LINE_PX[TILE_TITLE_PT] * max(len(w) for g in wrapped for w in g) + 4
        x = MARGIN
        for group, group_titles in zip(row, wrapped):
            for tile, lines in zip(group, group_titles):
                h, w = tile.pixels.shape[:2]
                texts.append((x + w / 2, y + title_h - 4, "\n".join(lines), TILE_TITLE_PT, "black", "center",
                              "bottom"))
                placed.append((y + title_h, x, tile))
                texts += [(x + mx, y + title_h + my, text, 7, colour, "center", "center")
                          for mx, my, text, colour in tile.marks]
                x += w + TILE_GAP
            x += GROUP_GAP - TILE_GAP
        y += title_h + max(t.pixels.shape[0] for g in row for t in g) + ROW_GAP
    tiles_bottom = y - ROW_GAP
    height = y - ROW_GAP + (8 + LINE_PX[NOTE_PT] * len(note_lines) if note_lines else 0) + MARGIN

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def at(px: float, py: float) -> tuple[float, float]:   # pixels from the top left -> figure fractions
        return px / width, 1 - py / height

    fig.text(*at(width / 2, MARGIN), "\n".join(title_lines), fontsize=TITLE_PT, ha="center", va="top",
             fontweight="bold")
    for top, left, tile in placed:
        pixels = np.ascontiguousarray(tile.pixels, dtype=np.uint8)
        if pixels.ndim == 2:   # grey: as RGB (figimage would colour a 2-d array with its default colour map)
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        fig.figimage(pixels, xo=left, yo=height - top - pixels.shape[0], origin="upper")
    for px, py, text, pt, colour, ha, va in texts:
        fig.text(*at(px, py), text, fontsize=pt, color=colour, ha=ha, va=va)
    if note_lines:
        fig.text(*at(MARGIN, tiles_bottom + 8), "\n".join(note_lines), fontsize=NOTE_PT, ha="left", va="top",
                 color="#333333")

    box = None
    if isinstance(key, ColourBar):
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        left, top = MARGIN + tiles_w + GROUP_GAP, tiles_top + LINE_PX[TILE_TITLE_PT] + 4
        bar_h = min(tiles_bottom - top, 2 * TILE)
        box = (top, left, bar_h, 18)
        cax = fig.add_axes([left / width, 1 - (top + bar_h) / height, 18 / width, bar_h / height])
        bar = fig.colorbar(ScalarMappable(Normalize(key.vmin, key.vmax), key.cmap), cax=cax, ticks=key.ticks)
        bar.set_label(key.label, fontsize=TILE_TITLE_PT)
        bar.ax.tick_params(labelsize=NOTE_PT)
    elif isinstance(key, Legend):
        left, top = MARGIN + tiles_w + GROUP_GAP, tiles_top
        fig.text(*at(left, top), key.title, fontsize=TILE_TITLE_PT, ha="left", va="top", fontweight="bold")
        step, y0 = 20, top + LINE_PX[TILE_TITLE_PT] + 8
        room = max(1, (tiles_bottom - y0) // step)
        entries = key.entries[:room]
        for i, (rgb, label) in enumerate(entries):
            swatch = np.broadcast_to(np.asarray(rgb, np.uint8), (14, 14, 3))
            fig.figimage(np.ascontiguousarray(swatch), xo=left, yo=height - (y0 + i * step) - 14, origin="upper")
            fig.text(*at(left + 20, y0 + i * step + 7), label, fontsize=NOTE_PT, ha="left", va="center")
        box = (y0, left, step * len(entries), key_w)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return Picture(image, [(top, left, *tile.pixels.shape[:2]) for top, left, tile in placed], box)


def save_png(image: np.ndarray, path: str) -> None:
    """Write uint8 RGB `image` to `path` atomically; the format follows the suffix (PNG when it says none)."""
    import os

    from PIL import Image

    from engine.storage.files import write_atomically
    picture = Image.fromarray(image)
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    write_atomically(path, lambda tmp: picture.save(tmp, format=image_format))
