"""What every picture of the project must show (engine.reporting.pictures), checked on its pixels and its layout."""
import numpy as np

from engine.reporting.pictures import TILE


def region(image: np.ndarray, box) -> np.ndarray:
    top, left, h, w = box
    return image[top:top + h, left:left + w]


def assert_stands_on_its_own(picture, groups: int, per_group: int) -> None:
    """One tile per image or map (no padding), each >= TILE px, inside the picture, disjoint and not blank; the
    tiles of a group side by side (same top, left to right); a colour bar or legend right of all tiles."""
    height, width = picture.image.shape[:2]
    tiles = picture.tiles
    assert len(tiles) == groups * per_group
    for box in tiles:
        top, left, h, w = box
        assert min(h, w) >= TILE and top >= 0 and left >= 0 and top + h <= height and left + w <= width
        pixels = region(picture.image, box)
        assert (pixels != pixels[0, 0]).any(), f"blank tile at {box}"
    for a in range(len(tiles)):
        for b in range(a):
            (ta, la, ha, wa), (tb, lb, hb, wb) = tiles[a], tiles[b]
            assert ta >= tb + hb or tb >= ta + ha or la >= lb + wb or lb >= la + wa, "tiles overlap"
    for g in range(groups):
        group = tiles[g * per_group:(g + 1) * per_group]
        assert len({top for top, _, _, _ in group}) == 1
        assert all(a[1] + a[3] < b[1] <= a[1] + a[3] + 10 for a, b in zip(group, group[1:]))   # beside
    assert picture.key is not None
    key = region(picture.image, picture.key)
    assert picture.key[1] >= max(left + w for _, left, _, w in tiles)   # right of the tiles: the picture is wider
    assert len(np.unique(key.reshape(-1, 3), axis=0)) > 4   # a colour ramp or swatches, not background


def assert_nearest_blocks(tile: np.ndarray, block: int) -> None:
    """`tile` is an image upsampled by nearest neighbour with factor `block`: each block x block square is flat."""
    squares = tile.reshape(tile.shape[0] // block, block, tile.shape[1] // block, block, -1)
    assert (squares == squares[:, :1, :, :1]).all()
