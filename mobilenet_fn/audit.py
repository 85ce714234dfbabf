"""Auditing a data set: label issues, duplicates, train/validation leakage and outliers.

    pool = load_pool("data/flowers")                       # every image, train and val, decoded once
    outputs = out_of_sample(pool, cfg, opts, folds=3)       # K-fold: each image predicted by a model not trained on it
    result = audit(pool, outputs)                           # the issues, ranked
    audit_report.write_report(Path("audits/flowers"), pool, outputs, result)   # report.json, issues.csv, ...

``out_of_sample`` trains one model per fold with ``train.Trainer`` (the recipe of ``train`` at a short budget) and
runs each on the fold it did not see; ``from_weights`` runs a trained model on everything instead (quick, but
biased: the model has seen, and may have memorised, the labels it is asked to judge). Each pass yields, per image,
the predicted probabilities, the cross-entropy of the given label, the margin (its logit minus the best other
one), a per-sample gradient norm from ``torch.func.vmap(torch.func.grad(...))`` and an embedding: the last
feature map (``model.features``), average-pooled. Label issues are ranked by confident learning (cleanlab's
``find_label_issues`` on the out-of-sample probabilities); near-duplicates are pairs whose standardised 16 x 16
thumbnails (or, with embed="features", the embeddings of ONE model, so that all images share one space) have a
cosine similarity over a threshold, computed a block at a time; exact duplicates share a hash of the decoded
pixels; outliers are images whose embedding is far from every class's centroid.

Nothing here prints or writes a file; ``audit_report`` writes the report, only into the folder it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .batches import batches
from .cache import cached_dataset
from .curation import item_names, stratified_folds
from .data import folder_dataset, load, sample_root
from .model import Config, fold_batchnorm, features
from .model import apply as model_apply
from .sources import DataError, Dataset, TensorSource
from .step import Policy, inference_policy, to_device

KINDS = ("label", "conflict", "leak", "duplicate", "outlier")
# What near-duplicates are found in: "pixels", each image's grey 16 x 16 thumbnail standardised by its own mean and
# spread, or "features", the pooled last feature map of one model (centred). At the threshold that finds most
# planted copies, features pair far more clean images than thumbnails do (features of a classifier gather a class
# in one spot): bench/audit_noise.py measures both on Fashion-MNIST and sets the defaults below.
EMBEDDINGS = ("pixels", "features")
DUPLICATE_THRESHOLD = {"pixels": 0.995, "features": 0.95}  # cosine similarity
THUMBNAIL = 16
OUTLIER_MADS = 6.0  # an outlier's distance to the nearest class centroid is this many MADs above the median
OUTLIER_FLOOR = 0.5  # and at least this (1 - cosine; 60 degrees), so that a tight, clean set flags none
GRAD_CHOICES = ("head", "full", "off")
# Confident learning flags an image whose given label the judge finds unlikely: sound only when the judge is good.
# A judge whose held-out top-1 is not at least halfway from chance (the commonest class's share) to 100 % (kappa
# 0.5) mistakes hard images for wrong labels about as often as it finds them (on 2,145 photos of 11 classes a judge
# of 19 % flagged 47 % of them; bench/audit_photos.py): the audit then ranks the labels and flags none.
JUDGE_MIN_KAPPA = 0.5
# Each fold model trains on as many pixels as the Fashion-MNIST audit's did (6 epochs of 46,667 images at 32 px):
# 1,500 training photos at 96 px get 21 epochs. It stops early when its held-out fold has not improved for
# PATIENCE epochs.
FOLD_PIXELS = 6 * 46_667 * 32 * 32
FOLD_EPOCHS = (6, 60)
PATIENCE = 5
# A folder's images are judged at this size unless asked otherwise: at a fixed budget of pixels, lower resolution buys
# the fold models more epochs (photos at 224 px got 6, and a judge of 19 % top-1).
JUDGE_RESOLUTION = 96


# ---------------------------------------------------------------------------------------------------------------
# Every image of a data set, in one place


@dataclass
class Pool:
    """All the images of a data set, train and validation together, as uint8 rows of one ``TensorSource``."""

    name: str
    classes: list[str]
    names: list[str]  # per image: its file path, or fashion-mnist/train/<i>
    source: TensorSource  # (N,) labels, images decoded once (a folder's cache)
    is_val: torch.Tensor  # (N,) bool: in the validation part of the data's own split
    preprocess: dict
    split: dict  # the data's split, as data.load describes it
    skipped: list[str] = field(default_factory=list)  # unreadable files
    ignored: list[str] = field(default_factory=list)  # files that are not images
    root: str | None = None  # the data's folder, when it is one

    @property
    def labels(self) -> torch.Tensor:
        return self.source.labels

    def __len__(self) -> int:
        return len(self.names)

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as stored: (C, H, W) uint8."""
        return self.source.gather(torch.tensor([i]))[0][0]


def load_pool(name: str, *, resolution: int | None = None, val_split: float = 0.2, seed: int = 0,
              cache: str = "auto", device: torch.device | None = None, progress=None) -> tuple[Pool, list]:
    """The data set ``name`` ("sample", "fashion-mnist" or a folder) as a ``Pool``, read through the decoded cache
    (``cache.cached_dataset``, for ``device``), and the cache reports. The sample is read from its folder, so that
    its images have file names."""
    if name == "sample":
        shown = load("sample", resolution=resolution)
        _, train, val, split = folder_dataset(sample_root(), val_split=val_split, seed=seed)
        dataset = dataclasses.replace(shown, train=train, val=val, split={**split, "kind": "sample"}, skipped=[])
    elif name == "imagenette":
        raise DataError("audit works on folders, sample and fashion-mnist; give imagenette's folder instead")
    else:
        dataset = load(name, resolution=resolution, val_split=val_split, seed=seed)
    train_names, val_names = item_names(dataset)
    decoded, reports = cached_dataset(dataset, cache, device=device, progress=progress)
    if not isinstance(decoded.train, TensorSource):
        raise DataError("audit reads images through the decoded cache; --cache off is not available here")
    unreadable = {s.path for s in decoded.skipped[len(dataset.skipped):]}
    names = [n for n in train_names + val_names if n not in unreadable]
    x_train, y_train = decoded.train.gather(torch.arange(len(decoded.train)))
    x_val, y_val = decoded.val.gather(torch.arange(len(decoded.val)))
    images = torch.cat([x_train, x_val])
    labels = torch.cat([y_train, y_val])
    n = len(labels)
    if n == 0:
        raise DataError(f"{name}: no readable images")
    counts = torch.bincount(labels, minlength=len(dataset.classes))
    if (counts > 0).sum() < 2:
        raise DataError(f"{name}: the readable images are of {int((counts > 0).sum())} class; an audit needs 2 or more")
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[len(y_train):] = True
    root = dataset.split.get("root")
    return Pool(dataset.name, list(dataset.classes), names, TensorSource(images, labels), is_val, dataset.preprocess,
                dataset.split, [str(s) for s in decoded.skipped], list(dataset.ignored), root), reports


# ---------------------------------------------------------------------------------------------------------------
# Per-sample outputs of a model: probabilities, loss, margin, gradient norm, embedding


@dataclass
class Outputs:
    """Per image of a pool (N of them, K classes, D features)."""

    logits: torch.Tensor  # (N, K) float32
    embeddings: torch.Tensor  # (N, D): the pooled last feature map, of ONE model for every image
    grad_norm: torch.Tensor | None  # (N,) the per-sample gradient norm, or None (--grad off)
    method: str  # "k-fold" or "weights"
    grad: str  # "head", "full" or "off"
    fold: torch.Tensor | None = None  # (N,) the fold each image was held out in (k-fold)
    fold_top1: list[float] = field(default_factory=list)  # each fold's held-out accuracy
    fold_epochs: list[int] = field(default_factory=list)  # the epoch each fold's model is from

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(1)


def per_sample_grad_norms(cfg: Config, params: dict, state: dict, x: torch.Tensor, y: torch.Tensor,
                          which: str = "head", pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The L2 norm of each sample's gradient of its cross-entropy (given label, eval-mode BatchNorm), by
    ``torch.func.vmap`` of ``torch.func.grad`` over one sample's forward: (N,).

    ``which="full"`` differentiates the whole parameter tree through ``model.apply`` of one image;
    ``"head"`` only the classifier, given the pooled features ``pooled`` (N, D) (computed from ``x`` when None).
    """
    from torch.func import grad, vmap

    if which == "full":
        def loss(p, xi, yi):
            logits, _ = model_apply(cfg, p, state, xi[None], train=False)
            return F.cross_entropy(logits, yi[None])

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    elif which == "head":
        if pooled is None:
            pooled = pooled_features(cfg, fold_batchnorm(cfg, params, state), x)

        def loss(fc, hi, yi):
            return F.cross_entropy(F.linear(hi[None], fc["weight"], fc["bias"]), yi[None])

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params["fc"], pooled, y)
    else:
        raise ValueError(f"--grad must be one of {', '.join(GRAD_CHOICES)}, got {which!r}")
    leaves = torch.utils._pytree.tree_leaves(grads)
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in leaves]).sum(0).sqrt()


def pooled_features(cfg: Config, folded: dict, x: torch.Tensor) -> torch.Tensor:
    """(N, C, R, R) -> (N, D): the last endpoint of ``features``, average-pooled (what the classifier sees)."""
    return features(cfg, folded, None, x)["stride32"].float().mean((2, 3))


def model_outputs(cfg: Config, params: dict, state: dict, source, preprocess: dict, *, grad: str = "head",
                  policy: Policy | None = None, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """One model on every item of ``source`` in order: {"logits" (N, K), "embeddings" (N, D), "grad_norm" (N,)
    (absent with grad="off")}, eval-mode BatchNorm. ``params`` and ``state`` on ``policy.device``."""
    policy = policy or inference_policy(torch.device("cpu"))
    with torch.no_grad():
        folded = fold_batchnorm(cfg, params, state)
    logits, embeddings, norms = [], [], []
    for batch in batches(source, preprocess, batch_size=batch_size, train=False, device=policy.device,
                         channels_last=policy.channels_last):
        with torch.no_grad(), policy.autocast():
            h = pooled_features(cfg, folded, batch.x)  # (B, D)
            logits.append(F.linear(h, params["fc"]["weight"], params["fc"]["bias"]).float().cpu())
        embeddings.append(h.cpu())
        if grad != "off":
            x = batch.x.contiguous() if grad == "full" else batch.x
            norms.append(per_sample_grad_norms(cfg, params, state, x, batch.y, grad, pooled=h).detach().cpu())
    out = {"logits": torch.cat(logits), "embeddings": torch.cat(embeddings)}
    if norms:
        out["grad_norm"] = torch.cat(norms)
    return out


@dataclass
class FoldEvent:
    """Progress of ``out_of_sample``: a training event of fold ``fold`` (1-based) of ``folds``."""

    fold: int
    folds: int
    event: object


def fold_epochs(n_train: int, resolution: int) -> int:
    """Epochs for a fold model that trains on ``n_train`` images at ``resolution``: FOLD_PIXELS' worth, within
    FOLD_EPOCHS."""
    lo, hi = FOLD_EPOCHS
    return max(lo, min(hi, round(FOLD_PIXELS / max(1, n_train * resolution ** 2))))


def out_of_sample(pool: Pool, cfg: Config, opts, *, folds: int = 3, grad: str = "head",
                  device: torch.device | str = "cpu", start: tuple[dict, dict] | None = None,
                  patience: int | None = PATIENCE) -> Iterator[FoldEvent | Outputs]:
    """K-fold out-of-sample outputs: for each fold, a ``train.Trainer`` run of ``opts`` on the other folds (from
    ``start`` = (params, state) when given, e.g. pretrained weights with a classifier for the pool's classes), then
    that model on the fold. A fold stops once its held-out accuracy has not improved for ``patience`` epochs and
    judges with its best epoch (the held-out fold picks one of a few epochs; None: its last epoch). Yields each
    fold's training events (``FoldEvent``) and, last, the ``Outputs``. The embeddings of every image come from fold
    1's model, so that they share one space."""
    from .train import EpochEvent, Trainer

    device = torch.device(device)
    fold = stratified_folds(pool.labels, folds, opts.seed)
    n, k = len(pool), len(pool.classes)
    logits, grad_norm = torch.zeros(n, k), torch.zeros(n)
    embeddings, fold_top1, fold_epoch = None, [], []
    for f in range(folds):
        held, rest = (fold == f).nonzero().flatten(), (fold != f).nonzero().flatten()
        dataset = Dataset(pool.name, pool.classes, pool.source.subset(rest), pool.source.subset(held),
                          pool.preprocess, {"kind": "audit-fold", "fold": f, "folds": folds})
        trainer = Trainer(cfg, opts, dataset, device)
        trainer.start_fresh(start)
        best_epoch = 0
        for event in trainer.run():
            yield FoldEvent(f + 1, folds, event)
            if isinstance(event, EpochEvent):
                epoch = event.metrics["epoch"]
                best_epoch = epoch if event.best else best_epoch
                if patience is not None and epoch - best_epoch >= patience:
                    break  # trainer.best_weights: the epoch best_epoch
        if patience is None:
            params, state, best_epoch = trainer.params, trainer.state, trainer.epoch
        else:
            params, state = (to_device(t, device) for t in trainer.best_weights)
        fold_epoch.append(best_epoch)
        policy = inference_policy(device)
        if f == 0:
            embeddings = model_outputs(cfg, params, state, pool.source, pool.preprocess, grad="off",
                                       policy=policy)["embeddings"]
        out = model_outputs(cfg, params, state, dataset.val, pool.preprocess, grad=grad, policy=policy)
        logits[held] = out["logits"]
        if grad != "off":
            grad_norm[held] = out["grad_norm"]
        fold_top1.append((out["logits"].argmax(1) == pool.labels[held]).float().mean().item())
    yield Outputs(logits, embeddings, None if grad == "off" else grad_norm, "k-fold", grad, fold, fold_top1,
                  fold_epoch)


def from_weights(pool: Pool, weights, *, grad: str = "head", device: torch.device | str = "cpu") -> Outputs:
    """The outputs of a trained model (a ``weights.Weights``) on every image: quick, but biased wherever the
    model was trained on the images it judges."""
    if list(weights.classes) != list(pool.classes):
        raise DataError(f"the weights' {len(weights.classes)} classes are not the data's {len(pool.classes)} "
                        f"(in the same order)")
    policy = inference_policy(torch.device(device))
    params, state = to_device(weights.params, policy.device), to_device(weights.state, policy.device)
    # The data's geometry (its images are stored for it), the weights' normalisation.
    preprocess = {**pool.preprocess, **{k: weights.preprocess[k] for k in ("mean", "std") if k in weights.preprocess}}
    out = model_outputs(weights.config, params, state, pool.source, preprocess, grad=grad, policy=policy)
    return Outputs(out["logits"], out["embeddings"], out.get("grad_norm"), "weights", grad)


# ---------------------------------------------------------------------------------------------------------------
# Finding the issues


def label_signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per item: "loss" (cross-entropy of the given label), "margin" (its logit minus the best other logit;
    negative when another class wins), "suggested" (the most probable class)."""
    given = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return {"loss": F.cross_entropy(logits, labels, reduction="none"), "margin": given - others,
            "suggested": logits.argmax(1)}


def confident_learning(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cleanlab's confident learning on out-of-sample ``probs``: (the flagged items, most likely first; every item's
    label quality score in [0, 1], low = suspect)."""
    from .extras import require

    require("cleanlab", "audit's label issues", "audit")
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p, y = probs.double().numpy(), labels.numpy()
    ranked = find_label_issues(y, p, return_indices_ranked_by="self_confidence")
    return torch.as_tensor(ranked, dtype=torch.long), torch.as_tensor(get_label_quality_scores(y, p))


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as JPEG's Y


def thumbnails(pool: Pool, chunk: int = 4096) -> torch.Tensor:
    """(N, 16 * 16) each stored image as grey (luma), area-downsampled to 16 x 16, minus its own mean, over its own
    standard deviation (at least 1 grey level), L2-normalised: the same picture resized, re-encoded or brightened
    stays close to itself. Grey, because JPEG keeps colour at half resolution: a 40 px quality-75 copy of a
    sharp-edged colour picture scored 0.990 in RGB and 0.999 in luma."""
    weights = torch.tensor(LUMA).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(pool), chunk):
        x = pool.source.gather(torch.arange(start, min(len(pool), start + chunk)))[0].float()
        x = (x * weights).sum(1, keepdim=True) if x.shape[1] == 3 else x  # (B, 1, H, W)
        t = F.adaptive_avg_pool2d(x, THUMBNAIL).flatten(1)  # (B, 16 * 16)
        t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp(min=1)
        out.append(F.normalize(t.double(), dim=1))
    return torch.cat(out)


def normalised(embeddings: torch.Tensor) -> torch.Tensor:
    """Centred on their mean and L2-normalised, so that a dot product is a cosine similarity. Centring takes out
    the direction every ReLU feature vector shares; without it unrelated images of one class scored 0.9 and more."""
    e = embeddings.double()
    return F.normalize(e - e.mean(0), dim=1)


def similar_pairs(e: torch.Tensor, threshold: float, *, block_floats: int = 1 << 24) -> torch.Tensor:
    """(P, 2) pairs i < j of rows of ``e`` (N, D), normalised, whose cosine similarity is at least ``threshold``,
    computed a block of rows at a time (never N x N at once)."""
    n = len(e)
    block = max(1, min(n, block_floats // max(n, 1)))
    found = []
    for start in range(0, n, block):
        sims = e[start:start + block] @ e.T  # (B, N)
        rows = torch.arange(start, min(n, start + block))[:, None]
        hit = (sims >= threshold) & (torch.arange(n)[None, :] > rows)
        i, j = hit.nonzero(as_tuple=True)
        found.append(torch.stack([i + start, j], 1))
    return torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.long)


def exact_pairs(pool: Pool, chunk: int = 4096) -> torch.Tensor:
    """(P, 2) pairs i < j of images with identical decoded pixels (the first of a set paired with each other)."""
    first: dict[bytes, int] = {}
    pairs = []
    for start in range(0, len(pool), chunk):
        rows = torch.arange(start, min(len(pool), start + chunk))
        images = pool.source.gather(rows)[0].contiguous()
        for i, image in zip(rows.tolist(), images):
            digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()
            if digest in first:
                pairs.append((first[digest], i))
            else:
                first[digest] = i
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def groups_of(n: int, pairs: torch.Tensor) -> torch.Tensor:
    """(N,) a group id per item: the connected components of ``pairs`` (union-find); a lone item is its own."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return torch.tensor([root(i) for i in range(n)], dtype=torch.long)


def outlier_scores(e: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) 1 - the cosine similarity of each (normalised) embedding to the nearest class centroid."""
    centroids = torch.zeros(k, e.shape[1], dtype=e.dtype).index_add_(0, labels, e)
    present = torch.bincount(labels, minlength=k) > 0
    sims = e @ F.normalize(centroids, dim=1).T
    sims[:, ~present] = float("-inf")
    return 1 - sims.max(1).values


@dataclass
class Judge:
    """How well the probabilities the audit judges by predict the given labels."""

    top1: float  # out of sample for k-fold; in sample (optimistic) for --weights
    chance: float  # the top-1 of always answering the commonest class

    @property
    def kappa(self) -> float:
        """The top-1's share of the way from chance to 100 % (Cohen's kappa with chance as the commonest class):
        0 no better than chance, 1 every image right."""
        return (self.top1 - self.chance) / (1 - self.chance) if self.chance < 1 else 0.0

    @property
    def flags_labels(self) -> bool:
        return self.kappa >= JUDGE_MIN_KAPPA

    def verdict(self) -> str:
        """One line on what the judge can be trusted with."""
        said = f"The judge's top-1 is {100 * self.top1:.1f}% (chance {100 * self.chance:.1f}%, kappa {self.kappa:.2f})"
        if self.flags_labels:
            return f"{said}: label issues flagged by confident learning."
        return (f"{said}: too weak to tell a wrong label from a hard image, so no label is flagged; signals.csv "
                f"ranks them (quality, low first). Train the folds longer (--epochs) or start them from pretrained "
                f"weights (--init).")


def judge_of(logits: torch.Tensor, labels: torch.Tensor, k: int) -> Judge:
    top1 = (logits.argmax(1) == labels).float().mean().item()
    return Judge(top1, (torch.bincount(labels, minlength=k).max() / len(labels)).item())


@dataclass
class Issue:
    index: int  # into the pool
    kind: str
    score: float  # higher = more suspect: 1 - label quality, a similarity, or an outlier distance
    suggested: int  # a class index
    other: int | None = None  # the image it duplicates or leaks with


@dataclass
class Audit:
    issues: list[Issue]
    signals: dict[str, torch.Tensor]  # per image: loss, margin, grad_norm, quality, outlier, suggested
    pairs: torch.Tensor  # (P, 2) near or exact duplicates
    exact: torch.Tensor  # (Q, 2) exact duplicates
    groups: torch.Tensor  # (N,) duplicate group of each image
    embed: str  # what duplicates were found in: "pixels" or "features"
    threshold: float
    outlier_cut: float
    judge: Judge

    def of_kind(self, kind: str) -> list[Issue]:
        return [i for i in self.issues if i.kind == kind]


def audit(pool: Pool, outputs: Outputs, *, embed: str = "pixels", threshold: float | None = None) -> Audit:
    """The issues of ``pool`` given a model's ``outputs`` on it, each kind ranked most suspect first. Duplicates
    are looked for in ``embed`` ("pixels" or "features") at cosine ``threshold`` (default per embedding)."""
    if embed not in EMBEDDINGS:
        raise ValueError(f"--embed must be one of {', '.join(EMBEDDINGS)}, got {embed!r}")
    threshold = DUPLICATE_THRESHOLD[embed] if threshold is None else threshold
    if not 0 < threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    labels = pool.labels
    signals = label_signals(outputs.logits, labels)
    ranked, quality = confident_learning(outputs.probs, labels)
    signals["quality"] = quality
    if outputs.grad_norm is not None:
        signals["grad_norm"] = outputs.grad_norm
    judge = judge_of(outputs.logits, labels, len(pool.classes))
    flagged = ranked.tolist() if judge.flags_labels else []
    issues = [Issue(i, "label", 1 - quality[i].item(), signals["suggested"][i].item()) for i in flagged]

    e = normalised(outputs.embeddings)
    d = thumbnails(pool) if embed == "pixels" else e
    exact = exact_pairs(pool)
    near = similar_pairs(d, threshold)
    pairs = torch.cat([exact, near]).unique(dim=0) if len(exact) + len(near) else near
    sims = (d[pairs[:, 0]] * d[pairs[:, 1]]).sum(1).clamp(max=1.0) if len(pairs) else torch.zeros(0)
    is_exact = {tuple(p) for p in exact.tolist()}
    best: dict[tuple[int, str], Issue] = {}

    def add(issue: Issue) -> None:
        key = (issue.index, issue.kind)
        if key not in best or issue.score > best[key].score:
            best[key] = issue

    for (i, j), sim in zip(pairs.tolist(), sims.tolist()):
        score = 1.0 if (i, j) in is_exact else sim
        if pool.is_val[i] != pool.is_val[j]:  # leakage: the validation copy is the one to drop
            v, t = (i, j) if pool.is_val[i] else (j, i)
            add(Issue(v, "leak", score, labels[t].item(), t))
        elif labels[i] != labels[j]:  # the same image under two labels: both are suspect
            add(Issue(i, "conflict", score, labels[j].item(), j))
            add(Issue(j, "conflict", score, labels[i].item(), i))
        else:  # a redundant copy: keep the first
            add(Issue(j, "duplicate", score, labels[j].item(), i))

    scores = outlier_scores(e, labels, len(pool.classes))
    signals["outlier"] = scores
    median = scores.median()
    mad = (scores - median).abs().median()
    cut = max((median + OUTLIER_MADS * 1.4826 * mad).item(), OUTLIER_FLOOR)
    order = scores.argsort(descending=True)
    outliers = [Issue(i, "outlier", scores[i].item(), signals["suggested"][i].item())
                for i in order.tolist() if scores[i] > cut]
    by_kind = sorted(best.values(), key=lambda x: (KINDS.index(x.kind), -x.score))
    return Audit(issues + by_kind + outliers, signals, pairs, exact, groups_of(len(pool), pairs), embed, threshold,
                 cut, judge)


# ---------------------------------------------------------------------------------------------------------------
# Fixing the split


def fixed_split(pool: Pool, result: Audit) -> tuple[str, object]:
    """What ``--fix-split`` writes: ("split.json", a split whose every duplicate group lies on one side) for a
    folder split by ``--val-split``; ("val-leaks.txt", the validation files that leak) for a fixed split (train/
    and val/ folders, or a named data set), whose files cannot be moved without moving files."""
    if pool.split.get("kind") != "split":
        leaks = sorted({pool.names[i.index] for i in result.of_kind("leak")})
        return "val-leaks.txt", leaks
    is_val = pool.is_val.clone()
    groups = result.groups
    for g in groups[torch.bincount(groups, minlength=len(pool))[groups] > 1].unique().tolist():
        members = (groups == g).nonzero().flatten()
        is_val[members] = bool(is_val[members].float().mean() > 0.5)  # the side most of it is on; ties: train
    root = pool.root
    split = {**pool.split, "val": sorted(os.path.relpath(pool.names[i], root) for i in is_val.nonzero().flatten().tolist()),
             "moved": int((is_val != pool.is_val).sum())}
    return "split.json", split
