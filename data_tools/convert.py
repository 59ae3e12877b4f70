"""Convert image data sets to FFCV .beton files: `python -m data_tools.convert {imagefolder,fashion_mnist,ade20k} ...`.

Every input is decoded and normalised to 8-bit RGB first, in parallel (CMYK, palette, grayscale, 16-bit and alpha
images are converted; alpha is composited onto white); inputs that cannot be read are skipped and listed, with the
reason, in OUT.skipped.tsv, and the run fails if more than --max_skip_fraction of them are skipped. Only the readable
ones are then handed to FFCV's writer (its worker processes hang instead of failing on an unreadable input, hence the
separate first pass: every image is decoded twice). The .beton is written under a temporary name and renamed at the
end; OUT.json records counts, class names, settings and the file's sha256.
"""
from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from data_tools.beton_check import file_sha256
from engine.config.extras import require
from engine.storage.files import OutputPathError, writable_parent_problem, write_atomically, write_text_atomically

# Pillow refuses "decompression bombs" inside Image.open; this module checks the pixel count itself (max_pixels)
# so that a too-large file is skipped with a clear reason instead of raising.
Image.MAX_IMAGE_PIXELS = None

MAX_SIDE_LIMIT = 65535      # FFCV stores width and height as uint16
MAX_LABEL = 2 ** 63 - 1     # FFCV's IntField is int64
ALPHA_BACKGROUND = (255, 255, 255)


class ConvertError(RuntimeError):
    """A problem with the inputs or options; reported as one line, exit status 1."""


class BadImage(ValueError):
    """One input that cannot be converted; its message is the reason written to the report."""


@dataclass(frozen=True)
class Settings:
    mode: str = "jpg"                # jpg | raw (raw: exact pixels, for small images)
    max_side: int = 512              # longer side is shrunk to this (0 = keep)
    quality: int = 90                # JPEG quality
    max_pixels: int = 178_956_970    # larger inputs are skipped (Pillow's own bomb limit)
    max_skip_fraction: float = 0.01  # fail when more inputs than this are unreadable
    workers: int = 2                 # processes (0 = all cores)

    def check(self) -> None:
        if self.mode not in ("jpg", "raw"):
            raise ConvertError(f"--mode must be jpg or raw, got {self.mode!r}")
        if not 0 <= self.max_side <= MAX_SIDE_LIMIT:
            raise ConvertError(f"--max_side must be in 0..{MAX_SIDE_LIMIT}, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ConvertError(f"--quality must be in 1..100, got {self.quality}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ConvertError(f"--max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.workers < 0 or self.max_pixels < 1:
            raise ConvertError("--workers must be >= 0 and --max_pixels >= 1")

    @property
    def processes(self) -> int:
        return self.workers or os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------------ reading
def _target_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    if not max_side or max(w, h) <= max_side:
        return w, h
    r = max_side / max(w, h)
    return max(1, round(w * r)), max(1, round(h * r))


def _open(path: str, max_pixels: int) -> Image.Image:
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        img = Image.open(path)
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except OSError as e:
        raise BadImage(f"truncated or corrupt: {e}") from None
    if img.width * img.height > max_pixels:
        raise BadImage(f"too large: {img.width}x{img.height} pixels > --max_pixels={max_pixels}")
    return img


def load_rgb(path: str, max_side: int = 0, max_pixels: int = Settings.max_pixels, exif: bool = True) -> np.ndarray:
    """Decode any Pillow-readable image to uint8 RGB [H, W, 3], longer side <= max_side, EXIF orientation applied
    when `exif` (not for images with annotations: those are drawn on the stored pixel grid).

    Raises BadImage with a one-line reason when the file cannot be used."""
    img = _open(path, max_pixels)
    try:
        if img.format == "JPEG" and max_side:
            img.draft("RGB", (max_side, max_side))   # DCT-domain downscale: big JPEGs decode several times faster
        img.load()
        if exif:
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors... for damaged files
        raise BadImage(f"truncated or corrupt: {e}") from None
    if img.mode == "F":
        raise BadImage("32-bit float pixels: convert the file to 8-bit first")
    if img.mode.startswith("I"):                     # 16/32-bit integer grayscale: keep the top 8 bits
        arr = np.asarray(img).astype(np.float64)
        full = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / full), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,)), rgba)
    img = img.convert("RGB")
    size = _target_size(img.width, img.height, max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    if max(img.size) > MAX_SIDE_LIMIT:
        raise BadImage(f"side over {MAX_SIDE_LIMIT} pixels: set --max_side")
    return np.asarray(img, dtype=np.uint8)


def load_label_map(path: str, size: tuple[int, int], max_pixels: int = Settings.max_pixels) -> np.ndarray:
    """A single-channel annotation PNG as uint8 [H, W], resized (nearest) to `size` = (w, h) of its image."""
    img = _open(path, max_pixels)
    try:
        img.load()
    except Exception as e:
        raise BadImage(f"annotation truncated or corrupt: {e}") from None
    if img.mode not in ("L", "P"):
        raise BadImage(f"annotation has mode {img.mode}; expected single-channel class ids (L or P)")
    if img.size != size:
        raise BadImage(f"annotation is {img.width}x{img.height}, its image {size[0]}x{size[1]}")
    return np.asarray(img, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Item:
    path: str
    label: int = -1
    annotation: str = ""


def imagefolder_items(src: str, root: Optional[str] = None) -> tuple[list[Item], Optional[list[str]], list[str]]:
    """(items, class names or None, ignored hidden files) of a class-folder tree or of a file list.

    A folder: each sub-folder is a class (sorted names -> ids 0..C-1) and every file in it is an input.
    A file: lines `PATH LABEL` (integer label, last field; '#' comments); PATH relative to --root or the list's folder.
    """
    if os.path.isdir(src):
        classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)) and not d.startswith("."))
        if not classes:
            raise ConvertError(f"{src}: no class sub-folders; expected SRC/<class>/<image> or a file list")
        items: list[Item] = []
        ignored: list[str] = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(src, name)):
                dirnames.sort()
                for f in sorted(filenames):
                    path = os.path.join(dirpath, f)
                    if f.startswith("."):
                        ignored.append(path)     # .DS_Store and the like: listed in the report, not counted
                    else:
                        items.append(Item(path, label))
        return items, classes, ignored
    if not os.path.isfile(src):
        raise ConvertError(f"{src}: no such folder or file list")
    base = root or os.path.dirname(os.path.abspath(src))
    items = []
    with open(src) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(",", " ").rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ConvertError(f"{src}:{n}: expected 'PATH LABEL' with a non-negative integer label, "
                                   f"got {line!r}")
            if int(parts[1]) > MAX_LABEL:
                raise ConvertError(f"{src}:{n}: label {parts[1]} is above {MAX_LABEL}, the largest a .beton stores "
                                   f"(int64); number the classes 0..C-1")
            items.append(Item(os.path.join(base, parts[0].strip()), int(parts[1])))
    if not items:
        raise ConvertError(f"{src}: the file list is empty")
    return items, None, []


def ade20k_items(src: str, split: str) -> tuple[list[Item], list[str]]:
    """Pairs images/<split>/X.jpg + annotations/<split>/X.png under SRC (ADEChallengeData2016 layout)."""
    img_dir, ann_dir = os.path.join(src, "images", split), os.path.join(src, "annotations", split)
    if not os.path.isdir(img_dir):
        raise ConvertError(f"{img_dir}: not found; SRC must hold images/{split}/ and annotations/{split}/ "
                           f"(ADEChallengeData2016 layout)")
    items, ignored = [], []
    for f in sorted(os.listdir(img_dir)):
        if f.startswith("."):
            ignored.append(os.path.join(img_dir, f))
            continue
        items.append(Item(os.path.join(img_dir, f), -1, os.path.join(ann_dir, os.path.splitext(f)[0] + ".png")))
    return items, ignored


# ------------------------------------------------------------------------------------------------------ passes
def _check_one(item: Item, s: Settings) -> str:
    """'' when the item converts, else the reason."""
    try:
        img = load_rgb(item.path, s.max_side, s.max_pixels, exif=not item.annotation)
        if item.annotation:
            if not os.path.exists(item.annotation):
                raise BadImage(f"no annotation ({item.annotation} missing)")
            _load_pair_label(item, img, s)
        return ""
    except BadImage as e:
        return str(e)


def _load_pair_label(item: Item, img: np.ndarray, s: Settings) -> np.ndarray:
    """The annotation of `item`, on the original pixel grid of its image, resized (nearest) like the image."""
    with Image.open(item.path) as im:
        size = im.size
    label = load_label_map(item.annotation, size, s.max_pixels)
    if (img.shape[1], img.shape[0]) != size:
        label = np.asarray(Image.fromarray(label).resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST))
    return label


class _Inputs:
    """What FFCV's writer processes index: the readable items, decoded again. A failure here (a file changed since
    the check) is recorded in shared memory and fails the run afterwards instead of hanging FFCV's writer."""

    def __init__(self, items: Sequence[Item], s: Settings, with_label: bool) -> None:
        self.items, self.s, self.with_label = items, s, with_label
        self.failed = mp.Value("i", -1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        item = self.items[i]
        try:
            img = load_rgb(item.path, self.s.max_side, self.s.max_pixels, exif=not item.annotation)
            if item.annotation:
                return img, _load_pair_label(item, img, self.s)
        except Exception:
            self.failed.value = i
            img = np.zeros((1, 1, 3), np.uint8)
            if item.annotation:
                return img, np.zeros((1, 1), np.uint8)
        return (img, item.label) if self.with_label else (img,)


def _progress(iterable: Iterable, total: int, show: bool, desc: str) -> Iterable:
    from tqdm import tqdm
    return tqdm(iterable, total=total, disable=not show, desc=desc, file=sys.stderr)


def _check_all(items: Sequence[Item], s: Settings, progress: bool) -> list[str]:
    work = functools.partial(_check_one, s=s)
    chunk = max(1, min(64, len(items) // (4 * s.processes) or 1))
    if s.processes == 1 or len(items) < 8:
        return list(_progress(map(work, items), len(items), progress, "checking"))
    with mp.get_context("fork").Pool(s.processes) as pool:
        return list(_progress(pool.imap(work, items, chunksize=chunk), len(items), progress, "checking"))


def _write_beton(out: str, fields: dict, dataset, processes: int, chunksize: int, desc: str, progress: bool,
                 check=None) -> str:
    """Write `dataset` to a temporary file, run `check()`, then rename it to `out`; returns its sha256."""
    from ffcv import writer as ffcv_writer
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    digest = []

    def write(tmp: str) -> None:
        writer = DatasetWriter(tmp, fields, num_workers=processes)
        with _WatchedWorkers(out, writer):
            writer.from_indexed_dataset(dataset, chunksize=chunksize)
        if check is not None:
            check()
        digest.append(file_sha256(tmp))   # what the loader's data.verify compares with

    ffcv_writer.tqdm = functools.partial(tqdm, disable=not progress, desc=desc, file=sys.stderr)
    try:
        write_atomically(out, write)
    finally:
        ffcv_writer.tqdm = tqdm
    return digest[0]


class _WorkerDied(Exception):
    pass


class _WatchedWorkers:
    """FFCV's DatasetWriter waits for its worker processes without looking at them: one that dies (a full disk, a
    label its field cannot store) leaves the parent polling a counter, or blocked on a queue, forever. Within this
    context, ffcv.writer's `Process`, `Queue` and `sleep` are wrapped: a worker records the exception that stopped it
    (one line, no traceback) and exits 1, and every wait of the parent looks at the workers. A dead worker stops the
    others and raises, in the parent: OSError (its errno, so the caller names the file and the cause) or
    ConvertError."""

    def __init__(self, out: str, writer) -> None:
        self.out, self.writer = out, writer
        self.procs: list = []
        self.queues: list = []
        self.parent = os.getpid()
        self.cause = mp.Array("c", 512)

    def __enter__(self) -> "_WatchedWorkers":
        import multiprocessing.queues
        import queue

        from ffcv import writer as ffcv_writer
        watch = self

        class WatchedQueue(multiprocessing.queues.Queue):
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize, ctx=mp.get_context())

            def get(self, block: bool = True, timeout: Optional[float] = None):
                if not block or timeout is not None or os.getpid() != watch.parent:
                    return super().get(block, timeout)
                while True:
                    try:
                        return super().get(True, 0.2)
                    except queue.Empty:
                        watch.check()

        def process(target, args):
            p = mp.Process(target=_guarded_worker, args=(target, self.cause, args))
            self.procs.append(p)
            return p

        def queue_(*args):
            q = WatchedQueue(*args)
            self.queues.append(q)
            return q

        def sleep(seconds: float) -> None:
            time.sleep(seconds)
            self.check()

        self.saved = {name: getattr(ffcv_writer, name) for name in ("Process", "Queue", "sleep")}
        ffcv_writer.Process, ffcv_writer.Queue, ffcv_writer.sleep = process, queue_, sleep
        return self

    def check(self) -> None:
        """Raises _WorkerDied when a worker exited with an error."""
        for p in self.procs:
            if p.exitcode not in (None, 0):
                raise _WorkerDied(p.exitcode)

    def __exit__(self, kind, error, tb) -> None:
        from ffcv import writer as ffcv_writer
        for name, value in self.saved.items():
            setattr(ffcv_writer, name, value)
        if kind is None:
            return
        for p in self.procs:     # the others wait for the dead one's page forever: stop them
            if p.exitcode is None and p.pid is not None:
                p.kill()
            if p.pid is not None:
                p.join()
        for q in self.queues:    # unread work left in a queue must not hold up this process's exit
            q.cancel_join_thread()
            q.close()
        memory = getattr(self.writer, "metadata_sm", None)
        if hasattr(memory, "unlink"):
            memory.close()
            memory.unlink()
        if kind is _WorkerDied:
            code, _, text = self.cause.value.decode(errors="replace").partition("\t")
            if code.isdigit() and int(code):
                raise OSError(int(code), os.strerror(int(code))) from None
            why = text or (f"killed by signal {-error.args[0]}" if error.args[0] < 0 else
                           f"exit status {error.args[0]}")
            raise ConvertError(f"writing {self.out} failed: a writer process stopped ({why}); nothing was written "
                               f"under {self.out}") from None


def _guarded_worker(target, cause, args) -> None:
    """An FFCV writer worker: the exception that stops it goes to the parent as one line, then exit status 1."""
    try:
        target(*args)
    except BaseException as e:  # noqa: BLE001 - whatever it is, the parent reports it
        code = e.errno if isinstance(e, OSError) and e.errno else 0
        text = f"{code}\t{type(e).__name__}: {e}".replace("\n", " ")
        with cause.get_lock():
            if not cause.value:
                cause.value = text.encode(errors="replace")[:len(cause) - 1]
        raise SystemExit(1) from None


def _write_json(path: str, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2))


def _prepare_out(out: str, force: bool) -> None:
    if not out.endswith(".beton"):
        raise ConvertError(f"{out}: the output name must end in .beton")
    if os.path.exists(out) and not force:
        raise ConvertError(f"{out} exists; pass --force to overwrite it")
    problem = writable_parent_problem(out)
    if problem:
        raise ConvertError(problem)
    for stale in (out + ".skipped.tsv",):
        if os.path.exists(stale):
            os.remove(stale)


def _convert(items: list[Item], out: str, s: Settings, *, kind: str, source: str, fields: dict,
             class_names: Optional[list[str]], ignored: list[str], progress: bool, force: bool) -> dict:
    """Check, write, rename, describe. Returns the sidecar's content."""
    _prepare_out(out, force)
    if not items:
        raise ConvertError(f"{source}: no input files found")
    t0 = time.time()
    reasons = _check_all(items, s, progress)
    skipped = [(it.path, r) for it, r in zip(items, reasons) if r]
    report = out + ".skipped.tsv"
    if skipped or ignored:
        with open(report, "w") as f:
            f.write("path\treason\n")
            f.writelines(f"{p}\t{r}\n" for p, r in skipped)
            f.writelines(f"{p}\tignored: hidden file\n" for p in ignored)
    fraction = len(skipped) / len(items)
    if fraction > s.max_skip_fraction:
        raise ConvertError(f"{len(skipped)} of {len(items)} inputs ({fraction:.1%}) could not be read, more than "
                           f"--max_skip_fraction={s.max_skip_fraction}; see {report}")
    good = [it for it, r in zip(items, reasons) if not r]
    if not good:
        raise ConvertError(f"none of the {len(items)} inputs could be read; see {report}")
    with_label = "label" in fields
    inputs = _Inputs(good, s, with_label)
    def check_inputs() -> None:
        if inputs.failed.value >= 0:
            raise ConvertError(f"{good[inputs.failed.value].path} became unreadable during the conversion; "
                               f"rerun it")
    digest = _write_beton(out, fields, inputs, s.processes, 16, "writing", progress, check_inputs)
    counts = None
    if with_label:
        labels, n = np.unique([it.label for it in good], return_counts=True)
        counts = {(class_names[k] if class_names else str(k)): int(c) for k, c in zip(labels, n)}
    meta = {"file": os.path.basename(out), "kind": kind, "source": os.path.abspath(source),
            "fields": {k: type(v).__name__ for k, v in fields.items()}, "num_samples": len(good),
            "num_inputs": len(items), "num_skipped": len(skipped), "skipped_report": report if skipped else None,
            "num_ignored": len(ignored), "class_names": class_names, "counts": counts,
            # what a classifier's head needs (the training commands take it from here): every class folder, or the
            # largest label of a file list + 1
            "num_classes": (len(class_names) if class_names else max(it.label for it in good) + 1) if with_label
            else None, "settings": asdict(s),
            "alpha_background": list(ALPHA_BACKGROUND), "sha256": digest, "seconds": round(time.time() - t0, 1),
            "ffcv": "1.0.2"}
    _write_json(out + ".json", meta)
    classes = f"{meta['num_classes']} classes, " if meta["num_classes"] else ""
    print(f"wrote {out}: {len(good)} images, {classes}{len(skipped)} skipped"
          + (f" (listed in {report})" if skipped else "") + f", {_size(out)}, sha256 {digest}", file=sys.stderr)
    return meta


def _size(path: str) -> str:
    """The file's size on disk, for the closing line."""
    size = float(os.path.getsize(path))
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _settings(**options) -> Settings:
    """Settings from command-line values, each checked for its type: `--workers=1.5` or `--quality=high` is a
    one-line error, not a traceback or a silent truncation."""
    for name, value in options.items():
        want = type(getattr(Settings, name))
        ok = not isinstance(value, bool) and (isinstance(value, want) or want is float and isinstance(value, int))
        if not ok:
            kind = {int: "an integer", float: "a number"}.get(want, "a string")
            raise ConvertError(f"--{name} must be {kind}, got {value!r}")
    s = Settings(**{k: float(v) if isinstance(getattr(Settings, k), float) else v for k, v in options.items()})
    s.check()
    return s


def _image_field(s: Settings):
    RGBImageField = require("ffcv.fields", "writing a .beton").RGBImageField
    return RGBImageField(write_mode=s.mode, jpeg_quality=s.quality)


# ------------------------------------------------------------------------------------------------------ commands
def imagefolder(src: str, out: str, mode: str = "jpg", max_side: int = 512, quality: int = 90, workers: int = 2,
                progress: bool = True, force: bool = False, max_skip_fraction: float = 0.01,
                max_pixels: int = Settings.max_pixels, root: str = "") -> None:
    """Class sub-folders (SRC/<class>/<image>) or a file list (`PATH LABEL` lines) -> OUT.beton (image, label)."""
    IntField = require("ffcv.fields", "writing a .beton").IntField
    s = _settings(mode=mode, max_side=max_side, quality=quality, max_pixels=max_pixels,
                  max_skip_fraction=max_skip_fraction, workers=workers)
    items, classes, ignored = imagefolder_items(src, root or None)
    _convert(items, out, s, kind="imagefolder", source=src, fields={"image": _image_field(s), "label": IntField()},
             class_names=classes, ignored=ignored, progress=progress, force=force)


def ade20k(src: str, out: str, split: str = "training", mode: str = "jpg", max_side: int = 0, quality: int = 90,
           workers: int = 2, progress: bool = True, force: bool = False, max_skip_fraction: float = 0.01,
           max_pixels: int = Settings.max_pixels) -> None:
    """ADE20K images/<split>/*.jpg + annotations/<split>/*.png -> OUT.beton (image, annotation: raw uint8 ids)."""
    from data_tools.ffcv_ops import LabelMapField
    s = _settings(mode=mode, max_side=max_side, quality=quality, max_pixels=max_pixels,
                  max_skip_fraction=max_skip_fraction, workers=workers)
    items, ignored = ade20k_items(src, split)
    _convert(items, out, s, kind="ade20k", source=src,
             fields={"image": _image_field(s), "annotation": LabelMapField()}, class_names=None, ignored=ignored,
             progress=progress, force=force)


class _ArrayInputs:
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple:
        return np.repeat(self.images[i][:, :, None], 3, axis=2), int(self.labels[i])


def fashion_mnist(out_dir: str, mode: str = "raw", quality: int = 95, workers: int = 2, progress: bool = True,
                  force: bool = False, data_dir: str = "") -> None:
    """Debian's Fashion-MNIST (dataset-fashion-mnist) -> OUT_DIR/train.beton and OUT_DIR/test.beton, 28x28 RGB."""
    from data_tools.fashion_mnist import CLASS_NAMES, DATA_DIR, load_fashion_mnist
    IntField = require("ffcv.fields", "writing a .beton").IntField
    s = _settings(mode=mode, max_side=0, quality=quality, max_pixels=Settings.max_pixels, max_skip_fraction=0.0,
                  workers=workers)
    outs = {split: os.path.join(out_dir, f"{split}.beton") for split in ("train", "test")}
    for out in outs.values():
        _prepare_out(out, force)
    for split, out in outs.items():
        try:
            images, labels = load_fashion_mnist(split, data_dir or DATA_DIR)
        except (FileNotFoundError, ValueError) as e:
            raise ConvertError(str(e)) from None
        digest = _write_beton(out, {"image": _image_field(s), "label": IntField()}, _ArrayInputs(images, labels),
                              s.processes, 1000, split, progress)
        ids, n = np.unique(labels, return_counts=True)
        _write_json(out + ".json", {
            "file": os.path.basename(out), "kind": "fashion_mnist", "split": split, "source": data_dir or DATA_DIR,
            "fields": {"image": "RGBImageField", "label": "IntField"}, "num_samples": int(len(images)),
            "num_inputs": int(len(images)), "num_skipped": 0, "class_names": list(CLASS_NAMES),
            "num_classes": len(CLASS_NAMES),
            "counts": {CLASS_NAMES[i]: int(c) for i, c in zip(ids, n)}, "settings": asdict(s), "sha256": digest,
            "ffcv": "1.0.2"})
        print(f"wrote {out}: {len(images)} images, {len(CLASS_NAMES)} classes, 0 skipped, {_size(out)}, sha256 "
              f"{digest}", file=sys.stderr)


COMMANDS = {"imagefolder": imagefolder, "fashion_mnist": fashion_mnist, "ade20k": ade20k}
# Failures a user fixes from the message alone, beyond engine.config.cli.USER_ERRORS: `beitv2 convert` prints them in
# one line.
CLI_ERRORS = (ConvertError,)


def main(argv: Optional[list[str]] = None) -> int:
    import fire

    from engine.config.cli import spell_flags, typed_command
    from engine.config.schema import ConfigError
    try:
        argv = spell_flags(COMMANDS, list(sys.argv[1:] if argv is None else argv))
        fire.Fire({name: typed_command(fn) for name, fn in COMMANDS.items()}, command=argv,
                  name="python -m data_tools.convert")
    except (ConfigError, ConvertError, OutputPathError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
