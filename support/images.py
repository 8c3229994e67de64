"""Reading an image whatever it is: a file or a member of a zip archive, any mode PIL reads (16-bit, palette,
transparent, CMYK), EXIF orientation applied, with a limit on pixels checked before anything is decoded; and a
Dataset that decodes a split's images in DataLoader workers, recording an unreadable one instead of stopping.
"""

import io
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# ---------------------------------------------------------------------------------------------------------
# ---- one image ----

MAX_IMAGE_PIXELS = 40_000_000  # 5x a 24-megapixel photo; a 420 KB PNG can ask for 1.9 GB of pixels


def load_image(image) -> Image.Image:
    """A path, binary file object or PIL image -> an RGB PIL image, EXIF orientation applied, any mode."""
    if isinstance(image, Image.Image):
        return _to_rgb(_upright(image))
    source = image if hasattr(image, "read") else os.fspath(image)
    try:
        if not hasattr(source, "read") and not stat.S_ISREG(os.stat(source).st_mode):
            raise ValueError("not a regular file")  # a FIFO or device would block or never end
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:  # checked before decoding a single pixel
                raise ValueError(f"{opened.width} x {opened.height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} this program decodes")
            opened.load()
            return _to_rgb(_upright(opened))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{getattr(source, 'name', source)}: cannot read this image ({e})") from e


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (phones store pictures sideways and set it) -> a new image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block should not make the picture unreadable
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips instead of scaling, so scale to 8 bits ourselves
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # transparent pixels become white, as in a browser, not black
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def preprocess_image(image, preprocessing: dict) -> torch.Tensor:
    """A path or PIL image -> a float tensor (3, size, size) ready for a backbone. A plain function of the
    backbone's `preprocessing` dict, so DataLoader workers need no model."""
    image = load_image(image)
    size = preprocessing["size"]
    if preprocessing["resize"] == "squash":
        image = image.resize((size, size), Image.BICUBIC)
    else:  # "shorter_side_then_center_crop", as CLIP preprocesses
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        if width * height > MAX_IMAGE_PIXELS:  # a 40,000,000 x 1 picture would ask for 9e9 x 224 pixels
            raise ValueError(f"{image.width} x {image.height} pixels: too elongated to resize")
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(preprocessing["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(3, 1, 1)
    return (pixels - mean) / std


# ---------------------------------------------------------------------------------------------------------
# ---- a split's images, from folders or zips ----

@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes are: a file in a folder, or a member of DATA_DIR/<folder>.zip."""
    name: str  # relative to the data folder ("images/x.jpg", "val2014.zip/val2014/x.jpg"): moves with it
    path: str  # what people are shown: the file, or the zip's path joined with the member
    zip_path: str | None = None
    member: str | None = None
    zip_size: int = -1  # the member's size and CRC from the zip's directory; -1 when it is not in the zip
    zip_crc: int = -1

    def fingerprint(self) -> list:
        """What the cache key needs to know about this file's content, without reading it."""
        if self.zip_path:
            return [self.zip_size, self.zip_crc]
        try:
            return [os.path.getsize(self.path)]
        except OSError:
            return [-1]  # missing: embedding will list it as unreadable


# What reading one damaged, missing or hostile picture can raise. Anything else is a bug, and stops the run
# rather than being recorded in the cache as an unreadable image.
IMAGE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error,
                Image.DecompressionBombError)


class Archives:
    """Open zip archives by path, each opened once per process: a ZipFile reads through one file position, so
    a handle inherited across fork and used by several DataLoader workers at once would hand them each other's
    bytes."""

    def __init__(self):
        self._open, self._pid = {}, None

    def __getstate__(self):  # open archives stay behind when a dataset is sent to spawned workers
        return {"_open": {}, "_pid": None}

    def read(self, source: ImageSource):
        """-> what load_image takes for `source`: its path, or the zip member's bytes in a file object."""
        if not source.zip_path:
            return source.path
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if source.zip_path not in self._open:
            self._open[source.zip_path] = zipfile.ZipFile(source.zip_path)
        try:
            return io.BytesIO(self._open[source.zip_path].read(source.member))
        except KeyError:
            raise FileNotFoundError(f"no {source.member} in {source.zip_path}") from None

    def close(self):
        for archive in self._open.values():
            archive.close()
        self._open.clear()


class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, pixels (3, S, S), error): image sources[i] decoded and preprocessed for a backbone (in
    DataLoader workers). An image that cannot be read gives zero pixels and the error's text, so that one bad
    file among 100,000 is recorded instead of stopping the run."""

    def __init__(self, sources: list[ImageSource], preprocessing: dict):
        self.sources, self.preprocessing, self.archives = sources, preprocessing, Archives()

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            return i, preprocess_image(self.archives.read(self.sources[i]), self.preprocessing), ""
        except IMAGE_ERRORS as e:
            size = self.preprocessing["size"]
            return i, torch.zeros(3, size, size), f"{type(e).__name__}: {e}"


def one_thread(_worker_id):
    # Workers only decode and resize JPEGs; left at the default they would each start as many math threads
    # as there are cores and fight the backbone for them.
    torch.set_num_threads(1)
