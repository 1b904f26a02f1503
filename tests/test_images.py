"""Input pictures and masks: every PIL mode, EXIF rotation, sizes, and the errors users make."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.generate.errors import UserError
from ldm.generate.images import load_image, load_image_and_mask, size_multiple_of


def save(tmp_path, image, name="in.png", **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def quiet(_):
    pass


def test_rgb_becomes_a_minus_one_to_one_tensor(tmp_path):
    array = np.zeros((16, 24, 3), dtype=np.uint8)
    array[..., 0], array[0, 0] = 255, (0, 128, 255)
    x = load_image(save(tmp_path, Image.fromarray(array)), log=quiet)
    assert x.shape == (1, 3, 16, 24) and x.dtype == torch.float32
    assert x[0, 0, 5, 5] == 1.0 and x[0, 1, 5, 5] == -1.0
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but only the left half is opaque
    rgba[:, :4, 3] = 255
    x = load_image(save(tmp_path, Image.fromarray(rgba, "RGBA")), log=quiet)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # opaque red
    torch.testing.assert_close(x[0, :, 0, 7], torch.ones(3))  # transparent -> white


def test_palette_with_a_transparent_entry(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    path = save(tmp_path, image, transparency=0)  # palette entry 0 (blue) is transparent
    x = load_image(path, log=quiet)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[0, :, 0, 7], torch.ones(3))


@pytest.mark.parametrize("mode,value,expected", [("L", 51, 51), ("I;16", 65535, 255), ("I;16", 257 * 40, 40), ("1", 1, 255)])
def test_greyscale_bilevel_and_16_bit(tmp_path, mode, value, expected):
    image = Image.new(mode, (8, 8), value)
    x = load_image(save(tmp_path, image), log=quiet)
    torch.testing.assert_close(x, torch.full((1, 3, 8, 8), expected / 127.5 - 1.0))


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((8, 16, 3), dtype=np.uint8)  # 16 wide, 8 high, white on the left
    array[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = save(tmp_path, Image.fromarray(array), "photo.jpg", exif=exif.tobytes(), quality=100)
    x = load_image(path, log=quiet)
    assert x.shape == (1, 3, 16, 8)  # shown upright: 8 wide, 16 high
    assert x[0, :, 2, 4].mean() > 0.9 and x[0, :, 13, 4].mean() < -0.9  # the white half is now on top


def test_other_sizes_are_resized_to_multiples_of_8_and_the_run_says_so(tmp_path):
    lines = []
    x = load_image(save(tmp_path, Image.new("RGB", (100, 75))), log=lines.append)
    assert x.shape[-2:] == (72, 96)
    assert lines == ["resized in.png from 100x75 to 96x72 (sides must be multiples of 8)"]
    assert size_multiple_of(3, 700, 8) == (8, 704)


def test_mask_white_is_repaint_resized_to_the_picture(tmp_path):
    image = save(tmp_path, Image.new("RGB", (64, 32)))
    mask_array = np.zeros((16, 32), dtype=np.uint8)  # half the picture's size, same shape
    mask_array[:, 16:] = 200
    mask_path = save(tmp_path, Image.fromarray(mask_array), "mask.png")
    pixels, mask = load_image_and_mask(image, mask_path, log=quiet)
    assert mask.shape == (1, 1, 32, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, :, :30].sum() == 0 and mask[0, 0, :, 34:].min() == 1


def test_transparent_mask_pixels_are_kept(tmp_path):
    image = save(tmp_path, Image.new("RGB", (16, 16)))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[...] = 255
    rgba[:8, :, 3] = 0  # top half transparent white
    _, mask = load_image_and_mask(image, save(tmp_path, Image.fromarray(rgba, "RGBA"), "mask.png"), log=quiet)
    assert mask[0, 0, :8].sum() == 0 and mask[0, 0, 8:].min() == 1


@pytest.mark.parametrize("case,message", [
    ("missing_image", "--init-img"), ("missing_mask", "--mask .*nowhere.png: no such file"),
    ("unreadable_mask", "cannot be read as an image"), ("other_shape", "must have the picture's shape"),
    ("black_mask", "nothing to repaint"),
])
def test_bad_masks_and_images_are_one_line_errors(tmp_path, case, message):
    image = save(tmp_path, Image.new("RGB", (32, 32)))
    mask = save(tmp_path, Image.new("L", (32, 32), 255), "mask.png")
    if case == "missing_image":
        image = tmp_path / "nowhere.png"
    elif case == "missing_mask":
        mask = tmp_path / "nowhere.png"
    elif case == "unreadable_mask":
        mask.write_bytes(b"this is not a picture")
    elif case == "other_shape":
        mask = save(tmp_path, Image.new("L", (32, 16), 255), "mask.png")
    elif case == "black_mask":
        mask = save(tmp_path, Image.new("L", (32, 32), 0), "mask.png")
    with pytest.raises(UserError, match=message) as error:
        load_image_and_mask(image, mask, log=quiet)
    assert "\n" not in str(error.value)


def test_a_truncated_picture_is_a_one_line_error(tmp_path):
    path = save(tmp_path, Image.effect_noise((64, 64), 50).convert("RGB"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read as an image"):
        load_image(path, log=quiet)
