"""Sources and where their items go: ``subset`` keeps every field; splits and folds are stratified and seeded."""

import pytest
import torch

from mobilenet_fn.curation import stratified_folds, stratified_split
from mobilenet_fn.quantize import random_subset
from mobilenet_fn.sources import DataError, FileSource, TensorSource


def cache_like() -> TensorSource:
    """Ten items over twelve stored rows, in another order: what a decoded cache gives after ``exclude``."""
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 1, 2, 2)
    rows = torch.tensor([11, 0, 9, 2, 7, 4, 5, 6, 3, 8])
    return TensorSource(images, rows.clone(), rows)  # each label is the value of its image


def test_a_tensor_subset_gathers_the_same_images_and_shares_them():
    source = cache_like()
    items = torch.tensor([7, 0, 3])
    part = source.subset(items)
    x, y = part.gather(torch.arange(len(part)))
    expected_x, expected_y = source.gather(items)
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y) and torch.equal(y, x[:, 0, 0, 0].long())
    assert part.images.data_ptr() == source.images.data_ptr()


def test_a_subset_of_an_in_memory_set_without_rows_is_a_subset_of_its_images():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = TensorSource(images, torch.arange(6))
    part = source.subset(torch.tensor([4, 1]))
    assert torch.equal(part.gather(torch.arange(2))[0], images[[4, 1]]) and part.labels.tolist() == [4, 1]


def test_a_file_subset_keeps_its_folder():
    source = FileSource([(f"/data/c{i % 2}/{i}.png", i % 2) for i in range(5)], "/data")
    part = source.subset(torch.tensor([3, 1]))
    assert part.samples == [("/data/c1/3.png", 1), ("/data/c1/1.png", 1)] and part.root == "/data"


def test_quantize_draws_its_images_through_the_rows_of_a_cache():
    source = cache_like()
    drawn = random_subset(source, 4, seed=1)
    x, y = drawn.gather(torch.arange(4))
    assert len(drawn) == 4 and torch.equal(y, x[:, 0, 0, 0].long())  # each label still names its own image
    assert random_subset(source, 10) is source
    files = FileSource([(f"/data/a/{i}.png", 0) for i in range(9)], "/data")
    assert random_subset(files, 3).root == "/data"


def test_splits_and_folds_are_stratified_and_seeded():
    labels = torch.arange(60) % 3
    train, val = stratified_split(labels, 0.2, seed=4)
    assert torch.bincount(labels[val]).tolist() == [4, 4, 4]
    assert sorted(train.tolist() + val.tolist()) == list(range(60))
    assert all(torch.equal(a, b) for a, b in zip((train, val), stratified_split(labels, 0.2, seed=4)))
    assert not torch.equal(val, stratified_split(labels, 0.2, seed=5)[1])
    fold = stratified_folds(labels, 4, seed=4)
    assert all(torch.bincount(fold[labels == c], minlength=4).tolist() == [5] * 4 for c in range(3))
    with pytest.raises(DataError, match="too few"):
        stratified_split(torch.tensor([0, 0, 1]), 0.5, seed=0)
