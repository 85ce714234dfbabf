"""The batched augmentations against the per-image torchvision / timm ops they stand for: same parameters, same
pixels (within float rounding)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mobilenet_fn import augment as A


def _images(n=6, c=3, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images with structure, so that geometric ops move something visible
    x = torch.rand(n, c, h // 4, w // 4, generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def _torchvision_trivial_op(op: str, image: torch.Tensor, magnitude: float) -> torch.Tensor:
    """What torchvision's TrivialAugmentWide applies for ``op`` at ``magnitude`` (its own dispatch)."""
    ta = v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)
    return ta._apply_image_or_video_transform(image, op, magnitude, interpolation=ta.interpolation, fill=ta._fill)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", A.TRIVIAL_OPS)
def test_each_trivial_augment_op_matches_torchvision_per_image(op, channels):
    x = _images(c=channels)
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(A.TRIVIAL_BINS, (len(x),), generator=g)
    negative = torch.rand(len(x), generator=g) < 0.5
    magnitude = A.trivial_magnitude(op, levels, negative)
    ours = A.trivial_op(op, x, magnitude)
    for i in range(len(x)):
        # torchvision's space, read from the class: the same bin gives the same magnitude
        space, signed = v2.TrivialAugmentWide._AUGMENTATION_SPACE[op]
        table = space(A.TRIVIAL_BINS, 20, 24)
        expected_m = 0.0 if table is None else float(table[levels[i]])
        if signed and negative[i]:
            expected_m = -expected_m
        if table is not None:
            assert float(magnitude[i]) == pytest.approx(expected_m, abs=1e-5)
        theirs = _torchvision_trivial_op(op, x[i], expected_m)
        torch.testing.assert_close(ours[i], theirs, atol=2e-5, rtol=0, msg=f"{op} at {expected_m}")


def test_trivial_augment_draws_an_op_per_image_and_is_seeded():
    x = _images(n=64)
    a = A.trivial_augment(x, torch.Generator().manual_seed(3))
    b = A.trivial_augment(x, torch.Generator().manual_seed(3))
    c = A.trivial_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = [(a[i] - x[i]).abs().max() > 1e-6 for i in range(len(x))]
    assert 0.6 * len(x) < sum(changed) < len(x)  # Identity and no-op magnitudes leave a few images as they were


def test_random_erasing_boxes_follow_timm_and_erase_matches_torchvision():
    n, h, w = 2000, 32, 40
    boxes = A.erase_boxes(n, h, w, 0.25, torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.T
    erased = bh > 0
    assert abs(erased.float().mean().item() - 0.25) < 0.03
    assert (top + bh <= h).all() and (left + bw <= w).all() and (bh < h).all() and (bw < w).all()
    area = (bh * bw)[erased].float() / (h * w)
    assert area.min() >= 0.015 and area.max() <= 0.36  # timm's (0.02, 1/3) of the area, rounded to pixels
    ratio = (bh.float() / bw.float())[erased]
    assert ratio.min() >= 0.28 and ratio.max() <= 1 / 0.28
    x = _images(n=8, h=h, w=w)
    values = torch.randn_like(x)
    ours = A.erase(x, boxes[:8], values)
    for i in range(8):
        t, l_, hh, ww = boxes[i].tolist()
        theirs = TF.erase(x[i], t, l_, hh, ww, values[i, :, t:t + hh, l_:l_ + ww]) if hh else x[i]
        assert torch.equal(ours[i], theirs)


def test_cutmix_boxes_and_targets_match_timm():
    from timm.data.mixup import mixup_target, rand_bbox

    h, w, n = 28, 36, 16
    lam = torch.distributions.Beta(1.0, 1.0).sample((n,))
    np.random.seed(0)
    cy, cx = np.random.randint(0, h, size=n), np.random.randint(0, w, size=n)
    ours = A.cutmix_boxes(lam, h, w, torch.from_numpy(cy), torch.from_numpy(cx))
    for i in range(n):
        yl, yh, xl, xh = _timm_box((h, w), float(lam[i]), int(cy[i]), int(cx[i]), rand_bbox)
        assert ours[i].tolist() == [yl, xl, yh - yl, xh - xl]
    # Targets: with one lam for the batch (timm's "batch" mode) ours equal timm's, label smoothing composed by
    # the loss (F.cross_entropy smooths probability targets as timm's mixup_target does).
    y = torch.randint(10, (n,))
    x = _images(n=n, h=h, w=w)
    lam_batch = torch.full((n,), 0.7)
    _, targets = A.mix(x, y, lam_batch, torch.zeros(n, 4, dtype=torch.long), 10)
    smoothing = 0.1
    smoothed = targets * (1 - smoothing) + smoothing / 10
    torch.testing.assert_close(smoothed, mixup_target(y, 10, lam=0.7, smoothing=smoothing))
    logits = torch.randn(n, 10)
    torch.testing.assert_close(F.cross_entropy(logits, targets, label_smoothing=smoothing),
                               torch.sum(-smoothed * F.log_softmax(logits, -1), -1).mean())


def _timm_box(shape, lam, cy, cx, rand_bbox):
    """timm's rand_bbox with its random centre forced to (cy, cx)."""
    real = np.random.randint
    try:
        calls = iter([cy, cx])
        np.random.randint = lambda *a, **k: next(calls)
        return rand_bbox(shape, lam)
    finally:
        np.random.randint = real


def test_mix_blends_or_pastes_each_image_with_its_mirror_and_weights_the_labels_by_area():
    n, h, w = 6, 10, 10
    x = _images(n=n, h=h, w=w)
    y = torch.arange(n) % 3
    lam = torch.tensor([0.3, 0.8, 0.5, 0.64, 1.0, 0.9])
    boxes = torch.zeros(n, 4, dtype=torch.long)
    boxes[3] = torch.tensor([2, 2, 6, 6])  # image 3: cutmix of a 6x6 box (36 % of the area)
    out, targets = A.mix(x, y, lam, boxes, 3)
    for i in (0, 1, 2, 4, 5):
        torch.testing.assert_close(out[i], lam[i] * x[i] + (1 - lam[i]) * x[n - 1 - i])
    pasted = x[3].clone()
    pasted[:, 2:8, 2:8] = x[2][:, 2:8, 2:8]
    assert torch.equal(out[3], pasted)
    for i in range(n):
        expected = torch.zeros(3)
        expected[y[i]] += lam[i]
        expected[y[n - 1 - i]] += 1 - lam[i]
        torch.testing.assert_close(targets[i], expected)


def test_mix_params_cutmix_lambda_is_the_kept_area_and_each_image_picks_one_kind():
    lam, boxes = A.mix_params(4000, 32, 32, 0.2, 1.0, torch.Generator().manual_seed(0))
    cut = boxes[:, 2] > 0
    assert 0.45 < cut.float().mean() < 0.55  # timm's switch probability 0.5
    torch.testing.assert_close(lam[cut], 1 - (boxes[cut, 2] * boxes[cut, 3]).float() / 1024)
    # mixup's Beta(0.2, 0.2) piles up near 0 and 1
    mixed = lam[~cut & (lam < 1)]
    assert ((mixed < 0.1) | (mixed > 0.9)).float().mean() > 0.5
    again, _ = A.mix_params(4000, 32, 32, 0.2, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(lam, again)


def test_the_random_resized_crop_flips_half_the_images():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(400, 1, 4, 4).contiguous()
    out = A.random_resized_crop(x, 4, torch.Generator().manual_seed(0), flip=True)
    increasing = (out[:, 0, :, -1] >= out[:, 0, :, 0]).all(dim=1).float().mean()
    assert 0.4 < increasing < 0.6


def _crop_areas(scale: tuple[float, float], n: int = 2000) -> torch.Tensor:
    """The share of the image each random resized crop holds, read off a ramp image: bilinear sampling of a ramp is
    exact, so the first and last output columns (rows) give where the crop's sides lie."""
    side, size = 256, 8
    ramp = (torch.arange(side) * 2 + 1) / side - 1  # each pixel's centre in grid_sample's [-1, 1]
    x = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side)])[None].expand(n, 2, side, side)
    out = A.random_resized_crop(x, size, torch.Generator().manual_seed(0), flip=False, scale=scale)
    span = 2 * (size - 1) / size  # from the first to the last sample, in units of the crop's side
    w = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / span
    h = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) / span
    return w * h


def test_the_random_resized_crop_holds_at_least_its_scale_of_the_area():
    wide = _crop_areas((0.25, 1.0))
    assert wide.min() >= 0.25 - 1e-3 and wide.max() <= 1 + 1e-3 and wide.min() < 0.3
    mild = _crop_areas((0.6, 1.0))
    assert mild.min() >= 0.6 - 1e-3 and mild.mean() > wide.mean() + 0.1


@pytest.mark.parametrize("scale", [(0.25, 1.0), (1.0, 1.0)])
def test_the_workers_crop_is_the_batched_crop_to_the_pixel(scale):
    """A loader worker's crop (one image, whole pixels, torchvision's resize) draws the batched crop's box and flip
    from the same generator: on a ramp, whose resampling is exact, the two agree to within the rounding to pixels."""
    side, size = 64, 8
    ramp = (torch.arange(side) * 2 + 1) / side - 1
    x = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side)])
    for seed in range(200):
        batched = A.random_resized_crop(x[None], size, torch.Generator().manual_seed(seed), scale=scale)[0]
        one = A.random_resized_crop_one(x, size, torch.Generator().manual_seed(seed), scale=scale)
        torch.testing.assert_close(one, batched, atol=3 / side, rtol=0)  # 1.5 px: rounding, and the filter at edges


def test_augment_batch_is_seeded_keeps_shapes_and_normalises():
    pre = {"resolution": 16, "resize": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    x = (torch.rand(8, 1, 20, 20) * 255).to(torch.uint8)
    y = torch.arange(8) % 4
    spec = A.Augment(auto_augment="trivial", reprob=0.5, mixup=0.2, cutmix=1.0)
    a = A.augment_batch(x, y, pre, spec, num_classes=4, generator=torch.Generator().manual_seed(0))
    b = A.augment_batch(x, y, pre, spec, num_classes=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (8, 3, 16, 16) and a[1].shape == (8, 4)
    torch.testing.assert_close(a[1].sum(1), torch.ones(8))
    small = x[..., :16, :16]  # without the crop, the caller hands over images of the resolution
    plain, labels = A.augment_batch(small, y, pre, A.Augment(crop_flip=False), num_classes=4,
                                    generator=torch.Generator())
    assert torch.equal(labels, y)
    torch.testing.assert_close(plain[:, 0] * 0.25 + 0.5, small[:, 0].float() / 255, atol=1e-6, rtol=0)
    assert math.isfinite(a[0].abs().max().item())


def test_batches_made_ahead_in_a_thread_are_the_batches_made_in_line(monkeypatch):
    from mobilenet_fn import batches as B
    from mobilenet_fn.sources import TensorSource

    images = (torch.rand(40, 1, 20, 20, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    source = TensorSource(images, torch.arange(40) % 4)
    pre = {"resolution": 16, "resize": 16, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3,
           "interpolation": "bilinear"}
    spec = A.Augment(auto_augment="trivial", reprob=0.5, mixup=0.2, cutmix=1.0)

    def epoch(start=0):
        return [(b.x, b.y) for b in B.batches(source, pre, batch_size=8, train=True, augment=spec, num_classes=4,
                                               seed=3, epoch=1, start=start)]

    ahead = epoch()
    threads = []
    real = B.made_ahead
    monkeypatch.setattr(B, "made_ahead", lambda made: threads.append(1) or real(made))
    assert len(epoch(start=2)) == 3 and threads == [1]  # the path under test made them ahead
    monkeypatch.setattr(B, "made_ahead", lambda made: made)
    in_line = epoch()
    assert len(ahead) == len(in_line) == 5
    for (xa, ya), (xb, yb) in zip(ahead, in_line):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_made_ahead_keeps_the_order_passes_errors_on_and_stops_when_the_caller_does():
    from mobilenet_fn.batches import made_ahead

    assert list(made_ahead(iter(range(5)))) == [0, 1, 2, 3, 4]
    produced = []

    def numbers():
        for k in range(100):
            produced.append(k)
            yield k

    taken = made_ahead(numbers())
    assert [next(taken) for _ in range(3)] == [0, 1, 2]
    taken.close()
    assert len(produced) <= 4  # at most one made ahead of what was taken

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(made_ahead(failing()))


def test_batches_made_ahead_use_a_quarter_of_the_cores_and_leave_the_other_threads_counts_alone():
    import sys
    import threading

    from mobilenet_fn.batches import made_ahead

    before = torch.get_num_threads()
    try:
        for threads, quarter in ((2, 1), (8, 2)):
            torch.set_num_threads(threads)
            counts = list(made_ahead(torch.get_num_threads() for _ in range(3)))
            started_after = []
            later = threading.Thread(target=lambda: started_after.append(torch.get_num_threads()))
            later.start()
            later.join()
            assert torch.get_num_threads() == threads and started_after == [threads]
            if sys.platform == "linux":  # torch's OpenMP is libgomp there
                assert counts == [quarter] * 3
    finally:
        torch.set_num_threads(before)


def test_mix_params_leave_torchs_global_generator_alone(monkeypatch):
    # They run in the batch thread while the step's dropout draws from torch's global generator: seeding or
    # restoring it there raced with the step (a resumed run with mixup then differed at one thread).
    def refuse(*args, **kwargs):
        raise AssertionError("the global generator was touched")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    monkeypatch.setattr(torch.random, "fork_rng", refuse)
    before = torch.get_rng_state()
    draws = [A.mix_params(64, 32, 32, 0.2, 1.0, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(*draws))  # a function of the generator alone
    lam, boxes = draws[0]
    assert ((lam > 0) & (lam <= 1)).all() and (boxes[:, 2] > 0).any() and (boxes[:, 2] == 0).any()
