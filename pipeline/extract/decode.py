"""Decoding for extraction: files to fixed-shape uint8 batches, as fast as the hardware allows.

Both decoders read files through :func:`~pipeline.data.images.read_checked`
(the content hash is checked) and yield ``(rows, batch, reasons)``: the
:class:`~pipeline.data.manifest.Row` records of the batch, a uint8
``(batch_size, 3, crop, crop)`` tensor in channels_last order (always the full
buffer: a fixed shape never makes ``torch.compile`` recompile for the last,
shorter batch; rows past ``len(rows)`` are to be ignored) and, per row,
``None`` or why it was skipped.

``extract.decoder``:

- ``pillow-exact``: Pillow in threads, exactly torchvision's ``weights.transforms()``.
- ``pillow``: the same, but JPEGs of at least 4x the resize target per side
  are decoded at reduced scale (draft mode: 1/2, 1/4 or 1/8 in the DCT), never
  below :data:`DRAFT_FACTOR` x the target; faster on camera photos, and the
  pixels change (measured on photos enlarged 3x: minimum cosine similarity of
  the features 0.9875 against exact decoding, below the 0.99 this project asks
  of a default).
- ``pillow-tensor``: Pillow decodes, torchvision resizes the uint8 tensor
  (antialiased, vectorised): resizing costs a third of Pillow's, pixels
  differ from ``pillow-exact`` by at most 2 levels in 255.
- ``torchvision``: ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG
  on a GPU), tensor resize there; other formats fall back to Pillow per image.
- ``auto``: torchvision on CUDA, pillow-tensor on a CPU (its features' cosine
  similarity to pillow-exact's was at least 0.99995 on the sample photos).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipeline.data.images import decode_checked, load_rgb, read_checked
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.errors import BadImage

#: The ``pillow`` decoder's reduced-scale JPEG decoding keeps at least this many
#: times the resize target per side (Pillow then picks the coarsest of 1/2, 1/4,
#: 1/8 that does), so the bicubic resize still has pixels to filter.
DRAFT_FACTOR = 2


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """``auto``: the torchvision (nvJPEG) decoder on CUDA, Pillow with tensor resizing on a CPU."""
    if decoder == "auto":
        return "torchvision" if device.type == "cuda" else "pillow-tensor"
    return decoder


def batches(decoder: str, root, rows: list[Row], spec: TransformSpec, batch_size: int, threads: int,
            device: torch.device):
    """The batch iterator of a resolved ``decoder`` (close it when done).

    Pillow's threads start decoding at once, so a caller can start it before
    loading the network. ``.request`` records what was asked, so such an early
    start can be checked against what is needed later.
    """
    if decoder == "torchvision":
        source = TorchvisionBatches(root, rows, spec, batch_size, max(2, threads), device)
    else:
        source = PillowBatches(root, rows, spec, batch_size, threads, draft=decoder == "pillow",
                               tensor_resize=decoder == "pillow-tensor")
    source.request = (decoder, str(Path(root)), spec, batch_size, threads, str(device))
    return source


class PillowBatches:
    """Decode + resize with Pillow in threads, into reused uint8 batch buffers.

    Buffers are (B, H, W, 3): viewed as (B, 3, H, W) they are already in
    channels_last order, so the batch reaches the model without a layout copy.
    Decoding runs ahead of the model by at most ``n_buffers - 1`` batches.
    """

    def __init__(self, root, rows: list[Row], spec: TransformSpec, batch_size: int, threads: int,
                 draft: bool, n_buffers: int = 3, tensor_resize: bool = False):
        self.root, self.rows, self.spec = Path(root), rows, spec
        self.resize_crop = spec.resize_crop_tensor if tensor_resize else lambda im: np.asarray(spec.resize_crop(im))
        self.batch_size = batch_size
        side = DRAFT_FACTOR * spec.resize
        self.draft_size = (side, side) if draft else None
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        c = spec.crop
        self.free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            self.free.put(np.empty((batch_size, c, c, 3), dtype=np.uint8))
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True)
        self.thread.start()

    def _decode_into(self, buf, i, row: Row) -> str | None:
        image, why = decode_checked(self.root, row, draft_size=self.draft_size)
        if why:
            return why
        buf[i] = self.resize_crop(image)
        return None

    def _produce(self):
        try:
            for start in range(0, len(self.rows), self.batch_size):
                chunk = self.rows[start : start + self.batch_size]
                buf = self._get(self.free)
                if buf is None:
                    return
                reasons = list(self.pool.map(lambda a: self._decode_into(buf, *a), enumerate(chunk)))
                self.ready.put((chunk, buf, reasons))
            self.ready.put(None)
        except BaseException as e:  # surface in the consumer, never hang it
            self.ready.put(e)

    def _get(self, q):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self):
        while (item := self.ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            chunk, buf, reasons = item
            yield chunk, torch.from_numpy(buf).permute(0, 3, 1, 2), reasons
            self.free.put(buf)  # the consumer has copied it to float by now

    def close(self):
        self.stop.set()
        self.thread.join()
        self.pool.shutdown(wait=True)


class TorchvisionBatches:
    """The GPU path: files read in threads, JPEGs decoded in batches on the device.

    ``decode_jpeg(device='cuda')`` uses nvJPEG; resizing and cropping then
    happen on the GPU too. A file nvJPEG cannot take (PNG, CMYK, corrupt)
    falls back to Pillow on the CPU, one image at a time. On a CPU device the
    same code runs with libjpeg-turbo, which is how it is tested without a GPU.
    """

    def __init__(self, root, rows: list[Row], spec: TransformSpec, batch_size: int, threads: int,
                 device: torch.device):
        self.root, self.rows, self.spec = Path(root), rows, spec
        self.batch_size, self.device = batch_size, device
        self._interp = InterpolationMode(spec.interpolation)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="read")

    def _jpeg(self, data):
        return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True, device=self.device)

    def _fallback(self, row: Row, data: bytes):
        try:
            a = np.asarray(load_rgb(self.root / row.path, data=data))
        except BadImage as e:
            return None, e.reason
        return torch.from_numpy(a.copy()).permute(2, 0, 1).to(self.device, non_blocking=True), None

    def _decode_batch(self, chunk: list[Row], datas):
        images: list = [None] * len(chunk)
        reasons: list = [None] * len(chunk)
        jpeg = [i for i, d in enumerate(datas) if d is not None and d[:3] == b"\xff\xd8\xff"]
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = self._jpeg(tensors) if tensors else []
        except RuntimeError:  # one bad file fails the whole batch: retry one by one
            decoded = []
            for t in tensors:
                try:
                    decoded.append(self._jpeg(t))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(jpeg, decoded):
            images[i] = img
        for i, d in enumerate(datas):
            if d is not None and images[i] is None:
                images[i], reasons[i] = self._fallback(chunk[i], d)
        return images, reasons

    def _read(self, chunk: list[Row]):
        return list(self.pool.map(lambda r: read_checked(self.root, r), chunk))

    def __iter__(self):
        c = self.spec.crop
        batch = torch.empty((self.batch_size, 3, c, c), dtype=torch.uint8, device=self.device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        chunks = [self.rows[s : s + self.batch_size] for s in range(0, len(self.rows), self.batch_size)]
        pending = self.pool.submit(self._read, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            results = pending.result()
            # Read the next batch's files while this one is decoded and run.
            pending = self.pool.submit(self._read, chunks[k + 1]) if k + 1 < len(chunks) else None
            images, reasons = self._decode_batch(chunk, [d for d, _ in results])
            reasons = [why or r for (_, why), r in zip(results, reasons)]
            for i, img in enumerate(images):
                if img is not None and reasons[i] is None:
                    img = F.resize(img, self.spec.resize, interpolation=self._interp, antialias=True)
                    batch[i] = F.center_crop(img, self.spec.crop)
            yield chunk, batch, reasons

    def close(self):
        self.pool.shutdown(wait=True)
