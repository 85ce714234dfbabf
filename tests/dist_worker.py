"""Run by tests/test_distributed.py under torchrun (or alone): trains on a small synthetic set and saves what each
process ends with, so the test can compare ranks with each other and with a single process."""

import sys
from pathlib import Path

import torch

from mobilenet_fn import Config, distributed
from mobilenet_fn.sources import Dataset, TensorSource
from mobilenet_fn.preprocess import preprocess_for
from mobilenet_fn.options import TrainOptions
from mobilenet_fn.train import Trainer


VAL_ITEMS = 51  # odd: 2 ranks get shards of 26 and 25, so a shard that pads or drops an item shows


def synthetic(n: int, seed: int) -> TensorSource:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    images[:, labels % 3] //= 2  # a class signal to learn
    return TensorSource(images, labels)


def main(out: Path, global_batch: int) -> None:
    # float64: the comparison with one process then sees the algorithm, not float32 rounding (which flips ReLU
    # masks of near-zero activations and so differs at about 1e-3 between any two BatchNorm implementations).
    torch.set_default_dtype(torch.float64)
    ctx = distributed.setup("cpu")
    dataset = Dataset("synthetic", ["a", "b", "c", "d"], synthetic(192, 0), synthetic(VAL_ITEMS, 1),
                      preprocess_for(32, crop_pct=1.0, stats={"mean": [0.5] * 3, "std": [0.25] * 3}), {})
    opts = TrainOptions(data="synthetic", epochs=1, batch_size=global_batch // ctx.world, lr=0.05, augment="none",
                        compile="off", workers=0, sync_bn=True, warmup_epochs=0)
    cfg = Config(alpha=0.25, resolution=32, num_classes=4)
    trainer = Trainer(cfg, opts, dataset, torch.device("cpu"), dist=ctx)
    trainer.start_fresh()
    for _ in trainer.run():
        pass
    val = trainer.validate(dataset.val)
    torch.save({"params": trainer.params, "state": trainer.state, "val": {k: val[k] for k in ("top1", "top5", "loss", "n")},
                "confusion": val["confusion"]}, out / f"world{ctx.world}-rank{ctx.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
