"""The whole model: against timm with the same weights, purity, and the torch.func transforms."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map, tree_map_with_path

from conftest import assert_trees_close, randomize_batchnorm
from mobilenet_fn import Config, apply, features, init
from mobilenet_fn.model import fold_batchnorm
from mobilenet_fn.importers import from_timm

timm = pytest.importorskip("timm")


def _timm_pair(size: int = 64):
    torch.manual_seed(1)
    model = timm.create_model("mobilenetv1_100", act_layer="relu6", num_classes=1000)
    randomize_batchnorm(model)
    params, state = from_timm(model.state_dict())
    return model, Config(activation="relu6"), params, state, torch.randn(3, 3, size, size)


def test_eval_logits_match_timm():
    model, cfg, params, state, x = _timm_pair()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    out, new_state = apply(cfg, params, state, x, train=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert new_state is state


def test_train_logits_and_running_statistics_match_timm():
    model, cfg, params, state, x = _timm_pair()
    model.train()
    with torch.no_grad():
        ref = model(x)
    out, new_state = apply(cfg, params, state, x, train=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    _, ref_state = from_timm(model.state_dict())
    assert_trees_close(new_state, ref_state, atol=1e-5, rtol=1e-5)


def test_gradients_match_timm_autograd():
    model, cfg, params, state, x = _timm_pair()
    y = torch.tensor([1, 5, 999])
    model.train()
    F.cross_entropy(model(x), y).backward()
    ref_grads, _ = from_timm({k: (p.grad if p.grad is not None else torch.zeros_like(p))
                             for k, p in model.named_parameters()} | {k: b for k, b in model.named_buffers()})

    def loss(p):
        logits, _ = apply(cfg, p, state, x, train=True)
        return F.cross_entropy(logits, y)

    grads = torch.func.grad(loss)(params)
    assert_trees_close(grads, ref_grads, atol=1e-4, rtol=1e-3)


def test_apply_is_pure():
    cfg = Config(alpha=0.25, num_classes=7, dropout=0.2)
    params, state = init(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 40, 40)
    snapshot = tree_map(torch.clone, (params, state, x))
    _, new_state = apply(cfg, params, state, x, train=True)
    assert_trees_close((params, state, x), snapshot, atol=0, rtol=0)
    assert not torch.equal(new_state["blocks"][0]["dw_bn"]["mean"], state["blocks"][0]["dw_bn"]["mean"])


def test_init_is_reproducible_with_a_generator():
    cfg = Config(alpha=0.25, num_classes=5)
    a, _ = init(cfg, torch.Generator().manual_seed(3))
    b, _ = init(cfg, torch.Generator().manual_seed(3))
    c, _ = init(cfg, torch.Generator().manual_seed(4))
    assert_trees_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a["fc"]["weight"], c["fc"]["weight"])


def test_per_sample_gradients_with_vmap_equal_a_loop():
    cfg = Config(alpha=0.25, num_classes=4)
    params, state = init(cfg)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])

    def loss(p, xi, yi):
        logits, _ = apply(cfg, p, state, xi[None], train=False)
        return F.cross_entropy(logits, yi[None])

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        single = torch.func.grad(loss)(params, x[i], y[i])
        assert_trees_close(tree_map(lambda t: t[i], batched), single, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiles_with_fullgraph_and_matches_eager():
    cfg = Config(alpha=0.25, num_classes=10)
    params, state = init(cfg)
    x = torch.randn(2, 3, 32, 32)

    def forward(p, s, x):
        return apply(cfg, p, s, x, train=True)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    out, new_state = compiled(params, state, x)
    ref, ref_state = forward(params, state, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_trees_close(new_state, ref_state, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padding", ["torch", "tf"])
def test_features_are_the_trunk_of_apply(padding):
    cfg = Config(alpha=0.25, num_classes=6, padding=padding)
    params, state = init(cfg)
    x = torch.randn(2, 3, 64, 64)
    feats = features(cfg, params, state, x)
    assert list(feats) == ["stride2", "stride4", "stride8", "stride16", "stride32"]
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    pooled = feats["stride32"].mean((2, 3))
    logits, _ = apply(cfg, params, state, x, train=False)
    torch.testing.assert_close(pooled @ params["fc"]["weight"].T + params["fc"]["bias"], logits)


def test_ablations_change_the_tree():
    full, _ = init(Config(alpha=0.25, full_conv=True))
    shallow, _ = init(Config(alpha=0.25, shallow=True))
    assert len(full["blocks"]) == 13 and full["blocks"][0]["conv"]["weight"].shape == (16, 8, 3, 3)
    assert len(shallow["blocks"]) == 8
    x = torch.randn(1, 3, 32, 32)
    for cfg in (Config(alpha=0.25, full_conv=True), Config(alpha=0.25, shallow=True)):
        p, s = init(cfg)
        assert torch.isfinite(apply(cfg, p, s, x, train=False)[0]).all()


def test_width_multiplier_has_a_floor_of_8():
    cfg = Config(alpha=0.1)
    assert [c for _, _, c in cfg.blocks()][:2] == [8, 12]
    assert cfg.channels(32) == 8


@pytest.mark.parametrize("kwargs,message", [
    ({"alpha": 0}, "alpha"), ({"alpha": -1}, "alpha"), ({"resolution": 31}, "resolution"),
    ({"num_classes": 0}, "num_classes"), ({"activation": "gelu"}, "activation"), ({"padding": "same"}, "padding"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_small_input_is_a_clear_error():
    cfg = Config(alpha=0.25)
    params, state = init(cfg)
    with pytest.raises(ValueError, match="at least 32"):
        apply(cfg, params, state, torch.randn(1, 3, 16, 16), train=False)


FOLD_CASES = {
    "relu, torch padding": {},
    "relu6, tf padding": {"activation": "relu6", "padding": "tf", "bn_eps": 1e-3},
    "full_conv": {"full_conv": True, "alpha": 0.25},
    "shallow, relu6": {"shallow": True, "activation": "relu6"},
}


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("changes", FOLD_CASES.values(), ids=FOLD_CASES.keys())
def test_the_batchnorm_folded_tree_runs_the_same_walk_to_the_same_outputs(changes, size):
    cfg = Config(**{"alpha": 0.5, "num_classes": 7, "resolution": size, **changes})
    params, state = init(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    params, state = randomize_batchnorm_trees(params, state)
    folded = fold_batchnorm(cfg, params, state)
    assert set(folded["stem"]) == {"conv"} and set(folded["stem"]["conv"]) == {"weight", "bias"}
    assert set(folded["blocks"][0]) == ({"conv"} if cfg.full_conv else {"dw", "pw"})
    assert folded["fc"] is params["fc"]
    # NCHW and channels-last (the 1x1 maps of a 32 px input: a matrix product and a centre tap), and a
    # non-square input, whose TF padding differs per axis.
    odd = torch.randn(1, 3, size + 1, size + 15, generator=torch.Generator().manual_seed(3))
    for x in (x, x.contiguous(memory_format=torch.channels_last), odd.contiguous(memory_format=torch.channels_last)):
        ref, _ = apply(cfg, params, state, x, train=False)
        out, _ = apply(cfg, folded, None, x, train=False)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        assert ref.abs().max() > 0.1  # logits that could be wrong
        for name, endpoint in features(cfg, folded, None, x).items():
            torch.testing.assert_close(endpoint, features(cfg, params, state, x)[name], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at least 32"):
        apply(cfg, folded, None, torch.randn(1, 3, 16, 16), train=False)


BATCHNORM_RANGES = {"weight": (0.5, 1.5), "bias": (-0.2, 0.2), "mean": (-0.5, 0.5), "var": (0.5, 2.0)}


def randomize_batchnorm_trees(params: dict, state: dict) -> tuple[dict, dict]:
    """BatchNorm scales, shifts and running statistics away from 1 and 0 (as conftest's randomize_batchnorm does
    for nn.Modules), so that folding each of them is tested."""
    g = torch.Generator().manual_seed(2)

    def randomize(path, t):
        keys = [str(getattr(k, "key", "")) for k in path]
        if not any(k.endswith("bn") for k in keys):  # bn, dw_bn, pw_bn
            return t
        low, high = BATCHNORM_RANGES[keys[-1]]
        return low + (high - low) * torch.rand(t.shape, generator=g)

    return tree_map_with_path(randomize, params), tree_map_with_path(randomize, state)
