"""FFCV pieces this project adds: a label-map field and decoders that place whole images on a fixed canvas.

Why canvases: every random choice (crop box, flip, colour, RandAugment) is made on the device from a torch.Generator
seeded by (seed, step, rank, micro-batch), so a resumed run redraws exactly the same augmentations. FFCV's own
random decoders draw from numba's global RNG, which cannot be re-seeded per epoch without recompiling (about 20 s per
Loader). So FFCV only decodes: each image is copied, unscaled, into the top-left corner of a (max_h, max_w) canvas
and the real (h, w) comes from the file's metadata. One extra edge-replicated row and column keep bilinear sampling at
the image border from reading stale canvas pixels.

The RGB canvas has one more row than the largest image, the status row: its first byte says whether the image came out
entirely black (data_tools.beton_check). The decoder finds that out while the pixels are still in the CPU cache, and
stops at the first non-zero byte, so a real image costs a few byte reads instead of a pass over the batch;
FFCVSource cuts the row off before anything else sees the canvas.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Tuple, Type

import numpy as np

try:
    from ffcv.fields.base import ARG_TYPE, Field
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
except ImportError as e:   # one line naming `pip install 'beitv2-ds[data]'`, not ffcv's traceback
    from engine.config.extras import extra_error
    raise extra_error(e, ".beton files (FFCV)") from None


def canvas_shape(metadata: np.ndarray) -> Tuple[int, int]:
    """(max_h, max_w) over a field's metadata (needs 'height' and 'width')."""
    return int(metadata["height"].max()), int(metadata["width"].max())


class CanvasRGBDecoder(SimpleRGBImageDecoder):
    """Decode an RGBImageField (jpg or raw) into the top-left corner of a (max_h + 1, max_w, 3) uint8 canvas whose
    last row is the status row: `[max_h, 0, 0]` is 1 when the image is entirely black, else 0 (see the module doc).

    Subclasses FFCV's default decoder only because FFCV recognises a pipeline's decoder by that type. A JPEG that
    does not decode (libjpeg-turbo's error or warning) becomes an all-black image: FFCV's own decoder drops the
    return code and leaves whatever the reused buffer held, another sample's pixels.

    `flag_black=False` leaves the status row 0 without looking at the pixels: the no-check baseline of bench.loader.
    """

    def __init__(self, flag_black: bool = True) -> None:
        super().__init__()
        self.flag_black = flag_black

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple[AllocationQuery, ...]]:
        max_h, max_w = canvas_shape(self.metadata)
        shape = (max_h + 1, max_w, 3)   # + the status row
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((max_h * max_w * 3,), u8)))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        max_h, max_w = (np.int64(v) for v in canvas_shape(self.metadata))
        flag_black = self.flag_black

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                h = np.int64(field["height"])
                w = np.int64(field["width"])
                if field["mode"] == jpg:
                    buf = temp_storage[dst_ix]
                    failed = imdecode_c(data, buf, np.uint32(h), np.uint32(w), np.uint32(h), np.uint32(w), 0, 0, 1,
                                        1, False, False)
                    if failed:   # damaged data: a black image (data_tools.beton_check counts them), not stale pixels
                        buf[:3 * h * w] = 0
                    pixels = buf[:3 * h * w]
                else:
                    pixels = data[:3 * h * w]
                black = np.uint8(flag_black)
                for i in range(3 * h * w if flag_black else 0):   # stops at the first lit byte: O(1) for real images
                    if pixels[i] != 0:
                        black = np.uint8(0)
                        break
                img = pixels.reshape(h, w, 3)
                out = destination[dst_ix]
                out[max_h, 0, 0] = black
                out[:h, :w] = img
                if w < max_w:
                    out[:h, w] = out[:h, w - 1]
                if h < max_h:
                    right = w + 1 if w < max_w else w
                    out[h, :right] = out[h - 1, :right]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class LabelMapField(Field):
    """A variable-size uint8 label map (segmentation annotation), stored raw: FFCV has no lossless image codec."""

    @property
    def metadata_type(self) -> np.dtype:
        return np.dtype([("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])

    @staticmethod
    def from_binary(binary: ARG_TYPE) -> Field:
        return LabelMapField()

    def to_binary(self) -> ARG_TYPE:
        return np.zeros(1, dtype=ARG_TYPE)[0]

    def encode(self, destination, label: np.ndarray, malloc) -> None:
        if label.dtype != np.uint8 or label.ndim != 2:
            raise ValueError(f"label map must be a 2-d uint8 array, got {label.dtype} {label.shape}")
        destination["height"], destination["width"] = label.shape
        destination["data_ptr"], storage = malloc(label.nbytes)
        storage[:] = np.ascontiguousarray(label).reshape(-1)

    def get_decoder_class(self) -> Type[Operation]:
        return CanvasLabelDecoder


class CanvasLabelDecoder(Operation):
    """Copy a LabelMapField into the top-left corner of a (max_h, max_w) uint8 canvas (rest left as is)."""

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, AllocationQuery]:
        shape = canvas_shape(self.metadata)
        u8 = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=u8), AllocationQuery(shape, u8)

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                h = np.int64(field["height"])
                w = np.int64(field["width"])
                destination[dst_ix, :h, :w] = data[:h * w].reshape(h, w)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
