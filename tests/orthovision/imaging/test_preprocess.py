import numpy as np
import pytest
import torch

from orthovision.config import PreprocessConfig
from orthovision.imaging.preprocess import Preprocessor, clahe, fit_within, pad_center, to_uint8
from orthovision.model.tensors import to_model_input
from orthovision.training.augment import train_augmentation


def gradient(h: int, w: int, dtype=np.uint8, top: int = 255) -> np.ndarray:
    row = np.linspace(0, top, w)
    return np.tile(row, (h, 1)).astype(dtype)


@pytest.mark.parametrize(
    ("shape", "mode"),
    [
        ((224, 224), "letterbox"),
        ((372, 308), "letterbox"),
        ((50, 400), "letterbox"),
        ((1000, 900), "stretch"),
        ((100, 100), "letterbox"),
        ((20000 // 80, 1), "letterbox"),
    ],
)
def test_preprocessor_output_is_uint8_1xSxS(shape, mode):
    cfg = PreprocessConfig(resize_mode=mode)
    out = Preprocessor(cfg)(gradient(*shape))
    assert out.shape == (1, 224, 224)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_letterbox_keeps_aspect_and_pads_with_black():
    img = np.full((400, 200), 180, np.uint8)
    img[::7] = 90  # texture so CLAHE has something to do
    out = Preprocessor(PreprocessConfig())(img)[0]
    # 400x200 -> 224x112 content centred: columns 0..55 and 168..223 are padding.
    assert (out[:, :56] == 0).all() and (out[:, 168:] == 0).all()
    assert out[:, 56:168].mean() > 50


@pytest.mark.parametrize(
    ("shape", "mode", "box"),
    [
        ((400, 200), "letterbox", (56, 0, 112, 224)),
        ((306, 252), "letterbox", (20, 0, 184, 224)),
        ((101, 333), "letterbox", (0, 78, 224, 68)),
        ((224, 224), "letterbox", (0, 0, 224, 224)),
        ((1, 250), "letterbox", (0, 111, 224, 1)),
        ((400, 200), "stretch", (0, 0, 224, 224)),
    ],
)
def test_content_box_is_where_the_image_lies_in_the_model_input(shape, mode, box):
    """The box a viewer maps the heat map back with is exactly the non-padding area."""
    pre = Preprocessor(PreprocessConfig(resize_mode=mode, pad_value=7))
    out = pre(np.full(shape, 200, np.uint8))[0]
    assert pre.content_box(*shape) == box
    left, top, w, h = box
    inside = np.zeros(out.shape, bool)
    inside[top : top + h, left : left + w] = True
    assert (out[~inside] == 7).all() and (out[inside] != 7).all()


def test_fit_within_longer_side():
    assert fit_within(np.zeros((3000, 1500), np.uint8), 224).shape == (224, 112)
    assert pad_center(np.zeros((224, 112), np.uint8), 224).shape == (224, 224)


def test_clahe_increases_local_contrast():
    rng = np.random.default_rng(0)
    low_contrast = (120 + rng.normal(0, 3, (224, 224))).clip(0, 255).astype(np.uint8)
    out = clahe(low_contrast, 2.0, 8)
    assert out.std() > low_contrast.std() * 1.5


def test_to_uint8_rescales_16bit():
    img = gradient(10, 10, np.uint16, 4095)
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_to_uint8_constant_is_zero():
    assert to_uint8(np.full((4, 4), 7, np.uint16)).max() == 0


def test_to_model_input_normalises_per_channel():
    batch = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_model_input(batch, mean, std)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(mean, std, strict=True)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))
    assert to_model_input(batch, mean, std, channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(1, 1, 8, 8),
        torch.zeros(8, 8, dtype=torch.uint8),
    ],
)
def test_to_model_input_rejects_wrong_payload(bad):
    with pytest.raises(ValueError):
        to_model_input(bad, (0.5,) * 3, (0.5,) * 3)


def test_preprocess_hash_changes_with_pixel_parameters():
    base = PreprocessConfig()
    assert base.param_hash() == PreprocessConfig().param_hash()
    assert base.param_hash() != PreprocessConfig(clahe_clip_limit=3.0).param_hash()
    assert base.param_hash() != PreprocessConfig(resize_mode="stretch").param_hash()


def test_augmentation_keeps_shape_and_dtype_and_changes_pixels():
    torch.manual_seed(0)
    img = torch.from_numpy(Preprocessor()(gradient(300, 250)))
    aug = train_augmentation()
    outs = [aug(img) for _ in range(4)]
    assert all(o.shape == img.shape and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, img) for o in outs)
