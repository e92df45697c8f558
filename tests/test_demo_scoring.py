"""The demo's pixel scorer reads the synthetic renderer's images correctly (it judges generated ones)."""

import numpy as np

from blip3o_jax import demo_scoring
from blip3o_jax.data import synthetic


def test_scorer_on_rendered_images():
    rng = np.random.default_rng(0)
    images, objects = [], []
    for _ in range(200):
        scene = synthetic.random_scene(rng, two_objects=False)
        images.append(np.asarray(synthetic.render(scene, 64, rng)))
        objects.append(scene[0])
    acc = demo_scoring.accuracy(images, objects)
    assert acc["n"] == 200
    assert acc["color_accuracy"] == 1.0 and acc["position_accuracy"] == 1.0
    assert acc["shape_accuracy"] >= 0.97, acc


def test_scorer_rejects_wrong_answers():
    rng = np.random.default_rng(1)
    scene = [{"shape": "square", "color": "red", "position": "left", "size": "large"}]
    image = np.asarray(synthetic.render(scene, 64, rng))
    assert demo_scoring.score_image(image) == {"color": "red", "shape": "square", "position": "left"}
    wrong = [{"shape": "circle", "color": "blue", "position": "right"}]
    assert demo_scoring.accuracy([image], wrong) == {"color_accuracy": 0.0, "shape_accuracy": 0.0,
                                                     "position_accuracy": 0.0, "n": 1}
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert demo_scoring.score_image(blank)["color"] is None


def test_scorer_on_corrupted_images():
    """Generated pictures are blurry and noisy: JPEG artefacts, blur and pixel noise keep the reading."""
    import io

    from PIL import Image, ImageFilter

    rng = np.random.default_rng(2)
    images, objects = [], []
    for i in range(120):
        scene = synthetic.random_scene(rng, two_objects=False)
        picture = synthetic.render(scene, 64, rng).filter(ImageFilter.GaussianBlur(1.0))
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=40)
        noisy = np.asarray(Image.open(buf), np.float32) + rng.normal(0, 10, (64, 64, 3))
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        objects.append(scene[0])
    acc = demo_scoring.accuracy(images, objects)
    assert acc["color_accuracy"] >= 0.95 and acc["position_accuracy"] >= 0.95, acc
    assert acc["shape_accuracy"] >= 0.8, acc
