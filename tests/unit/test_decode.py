from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rfsr_ray.data.decode import decode_image
from tests.conftest import bad_image_files, encode, natural_image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, bad_image_files(folder)


def test_every_case_gives_its_outcome(files):
    folder, expected = files
    for name, outcomes in expected.items():
        decoded = decode_image((folder / name).read_bytes(), min_size=32, max_pixels=10**7)
        if outcomes[0].startswith("skipped_"):
            assert decoded.image is None and decoded.skip == outcomes[0].removeprefix("skipped_")
            continue
        assert decoded.skip is None, name
        assert decoded.image.dtype == np.uint8 and decoded.image.shape[2] == 3, name
        converted = tuple(f"converted_{note}" for note in decoded.conversions)
        assert converted == tuple(o for o in outcomes if o != "decoded"), name


def test_exif_rotation_is_applied(files):
    folder, _ = files
    decoded = decode_image((folder / "rotated.jpg").read_bytes(), 0, 10**7)
    assert decoded.image.shape[:2] == (128, 96)  # stored 96x128, displayed rotated


def test_sixteen_bit_is_scaled_not_clipped(files):
    folder, _ = files
    image = decode_image((folder / "gray16.png").read_bytes(), 0, 10**7).image
    reference = np.asarray(Image.fromarray(natural_image(96, 128)).convert("L"))
    assert np.abs(image[..., 0].astype(int) - reference).max() <= 1


def test_rgba_composited_on_white():
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black
    decoded = decode_image(encode(Image.fromarray(rgba), "PNG"), 0, 10**7)
    assert (decoded.image == 255).all()


def test_pixel_limit_skips_before_decoding():
    data = encode(Image.fromarray(natural_image(200, 200)), "PNG")
    assert decode_image(data, 0, max_pixels=100 * 100).skip == "too_large"
    assert decode_image(data, 0, max_pixels=200 * 200).skip is None
