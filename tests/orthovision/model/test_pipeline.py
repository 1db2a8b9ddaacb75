"""Train and serve share the pixel path; rendered deploy files match the config."""

from __future__ import annotations

import numpy as np
import pytest
from support.data import SHARED, requires_shared
from support.images import gradient, make_dicom, make_jpeg, make_png

from orthovision.config import OrthoVisionConfig
from orthovision.errors import UnsupportedFormat
from orthovision.imaging.preprocess import Preprocessor
from orthovision.model.pipeline import PreparedBatch, model_pixels, prepare
from orthovision.paths import PROJECT_ROOT
from serve.manifests.presets import preset
from serve.manifests.render import render_text
from serve.manifests.serve_config import load_serve_file, serve_config, served_branches

ROOT = PROJECT_ROOT
CFG = OrthoVisionConfig()


def textured(h: int, w: int) -> np.ndarray:
    return (gradient(h, w).astype(np.int32) // 2 + 40).astype(np.uint8)


@pytest.mark.parametrize(
    "data",
    [
        make_png(textured(300, 260)),
        make_jpeg(textured(1200, 900)),
        make_dicom(pixels=(gradient(400, 320, np.uint16) >> 4)),
    ],
    ids=["png", "jpeg-reduced", "dicom"],
)
def test_training_and_serving_tensors_are_byte_identical(data):
    pre = Preprocessor(CFG.preprocess)
    train = model_pixels(data, CFG, pre)
    served = prepare(data, CFG, Preprocessor(CFG.preprocess)).pixels
    assert train.dtype == served.dtype == np.uint8
    assert train.tobytes() == served.tobytes()


@requires_shared
def test_byte_identical_on_a_real_radiograph():
    path = next((SHARED / "fracture-xray" / "fractured").glob("*.jpg"))
    data = path.read_bytes()
    pre = Preprocessor(CFG.preprocess)
    assert model_pixels(data, CFG, pre).tobytes() == prepare(data, CFG, pre).pixels.tobytes()


def test_prepared_batch_ships_pixels_once_and_keeps_every_outcome_in_order():
    import pickle

    pre = Preprocessor(CFG.preprocess)
    good = [prepare(make_png(textured(300, 260 + 10 * i)), CFG, pre) for i in range(3)]
    bad = UnsupportedFormat("not an image")
    batch = PreparedBatch.of([good[0], bad, good[1], good[2]], 224)
    assert batch.pixels.shape == (3, 1, 224, 224)
    wire = pickle.dumps(batch, protocol=5)
    assert len(wire) < batch.pixels.nbytes * 1.1  # not once more per item
    back = pickle.loads(wire)
    assert [type(i).__name__ for i in back.items] == [
        "Prepared",
        "UnsupportedFormat",
        "Prepared",
        "Prepared",
    ]
    assert back.items[1].message == "not an image" and back.items[1].http_status == 415
    for original, item in zip(good, (back.items[0], back.items[2], back.items[3]), strict=True):
        assert item.pixels.tobytes() == original.pixels.tobytes()
        assert item.quality == original.quality and item.input_info == original.input_info
    # A call whose every item was rejected still concatenates with the others' pixels
    # (a backbone merges calls): the regression that once answered 500.
    empty = pickle.loads(pickle.dumps(PreparedBatch.of([bad], 224)))
    assert len(empty.pixels) == 0 and len(empty) == 1
    assert np.concatenate([empty.pixels, back.pixels]).shape == (3, 1, 224, 224)


@pytest.mark.parametrize("name", ["local", "gpu"])
def test_committed_deploy_files_equal_their_render(name):
    committed = (ROOT / "deploy" / f"{name}.yaml").read_text()
    assert committed == render_text(preset(name)), "run `orthovision render` and commit"
    loaded, expected = load_serve_file(ROOT / "deploy" / f"{name}.yaml"), preset(name)
    # The model section is the served checkpoint's own (render.served_model).
    assert loaded.model_copy(update={"model": expected.model}) == expected
    assert [b.name for b in loaded.model.backbones] == served_branches(expected)


@pytest.mark.parametrize("name", ["local", "gpu"])
def test_rendered_config_is_a_valid_serve_deploy_schema(name):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config(preset(name)))
    assert schema.applications[0].import_path == "serve.app:build_app"


def test_presets_differ_where_they_should():
    local, gpu = preset("local").serve, preset("gpu").serve
    assert local.device == "cpu" and local.host == "127.0.0.1"
    assert gpu.backbone.num_gpus > 0 and gpu.preprocessor.autoscaled
    assert gpu.store_url.startswith("redis://")
