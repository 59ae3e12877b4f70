"""A .beton's header, schema and pointers checked against the file before FFCV reads it.

FFCV's Reader trusts the header: it allocates `num_samples` metadata rows before reading them (2^40 samples: an
allocation of terabytes), parses any field type a descriptor names, and its loader reads each sample at the pointer
its metadata holds, sized by a lookup in the allocation table that assumes the pointer is there (a pointer past the
end of the file or absent from the table reads outside the file's data, in compiled code). The canvases images are
decoded onto (data_tools/ffcv_ops.py) are as large as the largest image, so one header claiming a 60000 x 60000
image asks for 10 GB per image of a batch.

`check_beton(path)` reads the header, the field descriptors, the metadata and the allocation table (memory-mapped:
nothing is allocated by the header's say-so) and checks, each a one-line `BetonHeaderError` naming the file and the
value: the format version; the fields are those `data_tools.convert` writes (`image`, `label`, `annotation`, with
their types); every region lies inside the file; every sample's data pointer is in the allocation table and its
extent inside the data region; image sides are >= 1, raw images hold exactly h x w x 3 bytes and label maps h x w;
and the canvas (largest height x largest width) is at most `MAX_CANVAS_PIXELS`.

`check_schema(path, fields, wants)` says, in one line, when a stage is given a .beton of another kind (a
segmentation file to classification and the reverse).
"""
from __future__ import annotations

import os

import numpy as np

# Field name -> FFCV type id (ffcv.types.TYPE_ID_HANDLER; 255 is a custom field), as data_tools.convert writes them.
CONVERT_FIELDS = {"image": 2, "label": 1, "annotation": 255}
MAX_CANVAS_PIXELS = 178_956_970   # convert's --max_pixels default (Pillow's bomb limit): 0.5 GB of RGB per image
RAW_MODE = 1                      # ffcv.fields.rgb_image.IMAGE_MODES: jpg 0, raw 1
RECONVERT = "rewrite it with python -m data_tools.convert"


class BetonHeaderError(ValueError):
    """A .beton whose header or pointers do not fit the file; the message is one line."""


def _metadata_type(names: list[str]) -> np.dtype:
    """The per-sample metadata row of a file with these fields (FFCV's layout: one aligned struct)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import get_metadata_type

    from data_tools.ffcv_ops import LabelMapField
    handlers = {"image": RGBImageField, "label": IntField, "annotation": LabelMapField}
    return get_metadata_type([handlers[n]() for n in names])


def check_beton(path: str) -> list[str]:
    """Check the .beton at `path` against its own size (see the module doc); returns its field names in order.
    A path that is not a regular file is left to the caller's own error.

    Raises:
        BetonHeaderError: one line naming the file, the value that does not fit and what to do.
    """
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType
    if not os.path.isfile(path):
        return []
    size = os.path.getsize(path)

    def bad(what: str) -> BetonHeaderError:
        return BetonHeaderError(f"{path} is not a readable .beton: {what}; {RECONVERT}")

    if size < HeaderType.itemsize:
        raise bad(f"it is {size} bytes, shorter than the {HeaderType.itemsize}-byte header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise bad(f"format version {int(header['version'])}, not FFCV's {CURRENT_VERSION}")
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    page_size, table_ptr = int(header["page_size"]), int(header["alloc_table_ptr"])
    if not 1 <= num_fields <= len(CONVERT_FIELDS):
        raise bad(f"its header declares {num_fields} fields, convert writes 1 to {len(CONVERT_FIELDS)}")
    meta_start = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if meta_start > size:
        raise bad(f"its {num_fields} field descriptors end at byte {meta_start}, past its end ({size} bytes)")
    descs = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    names = []
    for desc in descs:
        raw = bytes(desc["name"]).split(b"\0", 1)[0]
        name = raw.decode("ascii", errors="replace")
        if CONVERT_FIELDS.get(name) != int(desc["type_id"]) or name in names:
            raise bad(f"field {name!r} (type {int(desc['type_id'])}) is not one data_tools.convert writes "
                      f"(image, label or annotation, once each)")
        names.append(name)
    if "image" not in names:
        raise bad(f"it has fields {names}, no 'image'")
    row = _metadata_type(names)
    meta_end = meta_start + num_samples * row.itemsize
    if meta_end > size:
        raise bad(f"its header declares {num_samples} samples ({num_samples * row.itemsize} bytes of metadata), "
                  f"more than its {size} bytes hold")
    if page_size < 4096 or page_size >= 1 << 32 or page_size & (page_size - 1):
        raise bad(f"page size {page_size} is not a power of two in 4 KiB..2 GiB")
    if not meta_end <= table_ptr <= size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise bad(f"its allocation table pointer {table_ptr} is outside bytes {meta_end}..{size} or cuts a row")
    if num_samples == 0:
        return names
    table = np.memmap(path, dtype=ALLOC_TABLE_TYPE, mode="r", offset=table_ptr) if table_ptr < size else \
        np.zeros(0, ALLOC_TABLE_TYPE)
    ptrs, sizes = table["ptr"], table["size"]
    outside = (ptrs < meta_end) | (sizes > np.uint64(table_ptr)) | (ptrs > np.uint64(table_ptr) - sizes) \
        | (table["sample_id"] >= np.uint64(num_samples))
    if outside.any():
        i = int(np.argmax(outside))
        raise bad(f"allocation {i} (sample {int(table['sample_id'][i])}, {int(sizes[i])} bytes at {int(ptrs[i])}) "
                  f"lies outside its data region {meta_end}..{table_ptr}")
    order = np.argsort(ptrs, kind="stable")
    sorted_ptrs, sorted_sizes = np.asarray(ptrs)[order], np.asarray(sizes)[order]
    metadata = np.memmap(path, dtype=row, mode="r", offset=meta_start, shape=(num_samples,))
    for f, name in enumerate(names):
        if name == "label":
            continue
        meta = metadata[f"f{f}"]
        h, w = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
        if (h < 1).any() or (w < 1).any():
            i = int(np.argmax((h < 1) | (w < 1)))
            raise bad(f"sample {i} of field '{name}' is {int(h[i])} x {int(w[i])} pixels")
        canvas = int(h.max()) * int(w.max())
        if canvas > MAX_CANVAS_PIXELS:
            i = int(np.argmax(h * w))
            raise bad(f"field '{name}' claims images up to {int(h.max())} x {int(w.max())} pixels (sample {i}: "
                      f"{int(h[i])} x {int(w[i])}), a canvas over {MAX_CANVAS_PIXELS} pixels")
        data_ptr = np.asarray(meta["data_ptr"])
        at = np.minimum(np.searchsorted(sorted_ptrs, data_ptr), len(sorted_ptrs) - 1)
        missing = sorted_ptrs[at] != data_ptr if len(sorted_ptrs) else np.ones(len(data_ptr), bool)
        if missing.any():
            i = int(np.argmax(missing))
            raise bad(f"sample {i} of field '{name}' points at byte {int(data_ptr[i])}, not at data of the file")
        stored = sorted_sizes[at].astype(np.int64)
        need = h * w * (3 if name == "image" else 1)
        wrong = (stored != need) & (np.asarray(meta["mode"]) == RAW_MODE) if name == "image" else stored < need
        if name == "image":
            wrong |= np.asarray(meta["mode"]) > RAW_MODE
        if wrong.any():
            i = int(np.argmax(wrong))
            raise bad(f"sample {i} of field '{name}' is {int(h[i])} x {int(w[i])} pixels but holds "
                      f"{int(stored[i])} bytes")
    return names


KINDS = {"annotation": "a segmentation .beton (image, annotation: label maps)",
         "label": "a classification .beton (image, label: class ids)",
         "": "an unlabelled .beton (image only)"}


def check_schema(path: str, fields: list[str], wants: str) -> None:
    """One line when the .beton at `path` (with `fields`) is not what a stage reads. `wants`: `labels` (class ids:
    fine-tuning, evaluation, k-NN, probes), `label_maps` (segmentation) or `images` (pretraining: class ids are
    ignored, label maps refused)."""
    kind = "annotation" if "annotation" in fields else "label" if "label" in fields else ""
    if wants == "labels" and kind != "label":
        raise BetonHeaderError(f"{path} is {KINDS[kind]}; classification needs class labels: convert a class-folder "
                               f"tree or a file list with python -m data_tools.convert imagefolder")
    if wants == "label_maps" and kind != "annotation":
        raise BetonHeaderError(f"{path} is {KINDS[kind]}; segmentation needs label maps: convert a segmentation "
                               f"data set with python -m data_tools.convert ade20k")
    if wants == "images" and kind == "annotation":
        raise BetonHeaderError(f"{path} is {KINDS[kind]}; this stage reads images with class labels or none: "
                               f"convert the images with python -m data_tools.convert imagefolder")


__all__ = ["BetonHeaderError", "CONVERT_FIELDS", "MAX_CANVAS_PIXELS", "check_beton", "check_schema"]
