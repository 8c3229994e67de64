"""Image loading: every mode becomes RGB, EXIF orientation is respected, unreadable files are named."""
import numpy as np
import pytest
from PIL import Image

from support.images import load_image, preprocess_image


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1", "I", "F"])
def test_any_mode_becomes_rgb(mode, tmp_path):
    base = Image.fromarray((np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(30, 40, 3))
    if mode == "I;16":
        image = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16))  # mode I;16
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
    else:
        image = base.convert(mode)
    path = tmp_path / ("image.tiff" if mode in ("I;16", "I", "F", "CMYK") else "image.png")
    image.save(path)
    for source in (path, image):
        rgb = load_image(source)
        assert rgb.mode == "RGB" and rgb.size == (40, 30)
    if mode == "I;16":  # 16-bit values are scaled to 8 bits, not clipped to white
        assert len(np.unique(np.asarray(load_image(path)))) > 100


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_respected(tmp_path):
    # stored 40 wide x 20 high with a red left half; Orientation 6 = display rotated 90 degrees clockwise
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes())
    upright = load_image(path)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[2, 10], np.asarray(upright)[37, 10]
    assert top[0] > 200 and bottom[0] < 60  # the red half is now on top


def test_unreadable_files_are_named(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read this image"):
        load_image(path)
    with pytest.raises(ValueError, match="missing.jpg: cannot read this image"):
        load_image(tmp_path / "missing.jpg")


def test_preprocessing_shapes_and_normalisation():
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    for resize in ("squash", "shorter_side_then_center_crop"):
        pixels = preprocess_image(image, {"size": 64, "resize": resize, "mean": [0.5] * 3, "std": [0.5] * 3})
        assert pixels.shape == (3, 64, 64)
        assert float(pixels.min()) == pytest.approx(1.0) and float(pixels.max()) == pytest.approx(1.0)
