"""torchex_fn.datasets: determinism, masks that match the drawn object, no colour shortcut."""
import pytest
import torch

from torchex_fn import datasets
from torchex_fn.data import synthetic


def test_shapes_and_types():
    data = datasets.shapes(10, seed=0, size=32)
    assert data.images.shape == (10, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.labels.shape == (10,) and data.labels.dtype == torch.int64
    assert data.masks.shape == (10, 1, 32, 32) and data.masks.dtype == torch.bool
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert set(data.labels.tolist()) <= set(range(len(datasets.CLASSES)))


def test_same_seed_gives_identical_tensors_and_other_seeds_differ():
    a, b, c = (datasets.shapes(16, seed=s) for s in (5, 5, 6))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.masks, c.masks)


def test_chunking_does_not_change_the_data(monkeypatch):
    # Generation works in chunks of examples; the chunk size must not change a single value.
    chunked = datasets.shapes(300, seed=3)
    monkeypatch.setattr(synthetic, "_CHUNK", 7)
    for a, b in zip(chunked, datasets.shapes(300, seed=3)):
        assert torch.equal(a, b)
    assert chunked.masks[:, 0].flatten(1).any(1).all()


def test_labels_are_balanced_and_num_classes_is_respected():
    data = datasets.shapes(40, seed=1, num_classes=2)
    assert data.labels.bincount().tolist() == [20, 20]
    assert datasets.shapes(400, seed=1).labels.bincount().tolist() == [100] * 4


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_cover_exactly_the_drawn_object(seed):
    # At difficulty 0 the noise is small (std 0.02) and the object's colour differs from the
    # background's by >= 0.5 in every channel (stripes add <= 0.05), so pixel colours tell the
    # object apart: every mask pixel has the object's colour and no other pixel has it.
    data = datasets.shapes(64, seed=seed, difficulty=0.0)
    for image, mask in zip(data.images, data.masks[:, 0]):
        assert mask.sum() >= 40  # objects are >= 18 px wide and cover about half of their box
        colour = image[:, mask].median(dim=1).values.view(3, 1, 1)
        near = (image - colour).abs().amax(dim=0) < 0.15
        assert torch.equal(near, mask)


def test_objects_vary_in_position_and_scale():
    masks = datasets.shapes(200, seed=2).masks[:, 0].float()
    rows = torch.arange(64.0).view(1, 64, 1)
    centre_row = (masks * rows).sum((1, 2)) / masks.sum((1, 2))
    area = masks.sum((1, 2))
    assert centre_row.std() > 8 and area.max() > 2.5 * area.min()


def test_class_cannot_be_told_from_the_mean_colour():
    train = datasets.shapes(2000, seed=10)
    test = datasets.shapes(2000, seed=11)
    features = train.images.mean(dim=(2, 3))  # [N, 3]
    centroids = torch.stack([features[train.labels == c].mean(0) for c in range(4)])
    # The class means of the mean colour nearly coincide ...
    assert (centroids - centroids.mean(0)).abs().max() < 0.02
    # ... and a nearest-centroid classifier on the mean colour stays near chance (0.25).
    dist = torch.cdist(test.images.mean(dim=(2, 3)), centroids)
    accuracy = (dist.argmin(1) == test.labels).float().mean()
    assert accuracy < 0.32


@pytest.mark.parametrize("kwargs, error", [
    (dict(num=0), ValueError), (dict(num=2.5), TypeError), (dict(num=4, size=4), ValueError),
    (dict(num=4, difficulty=1.5), ValueError), (dict(num=4, scale=(0.3, 0.2)), ValueError),
    (dict(num=4, num_classes=7), ValueError), (dict(num=4, seed="a"), TypeError),
])
def test_bad_arguments_raise_with_the_function_name(kwargs, error):
    with pytest.raises(error, match="shapes: expected"):
        datasets.shapes(**kwargs)
