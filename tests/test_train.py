"""Training: the step against autograd on timm, the optimizers, and the original project's mistakes."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_leaves, tree_map, tree_unflatten

from conftest import assert_trees_close, randomize_batchnorm
from mobilenet_fn import Config, apply, init
from mobilenet_fn.importers import from_timm
from mobilenet_fn.optim import Optimizer, adamw, decay_mask, make_schedule, rmsprop, sgd
from mobilenet_fn import step as step_lib
from mobilenet_fn.step import compile_step, make_step, use_compile, use_cuda_graphs

# An "optimizer" whose update returns the gradients as the new params: the step then hands back its gradients.
GRADS_OUT = Optimizer(init=lambda p: {}, update=lambda g, s, p, lr: (g, s))


@pytest.mark.slow
def test_compiled_step_has_no_graph_break_and_its_gradients_match_timm_autograd():
    timm = pytest.importorskip("timm")
    torch._dynamo.reset()
    # float64, so that the comparison sees the function computed and not float32 rounding, which the compiler's
    # fused reductions reorder (about 1e-3 relative in the stem's gradient of a randomly initialised net).
    model = timm.create_model("mobilenetv1_100", act_layer="relu6", num_classes=10)
    randomize_batchnorm(model)
    params, state = tree_map(torch.Tensor.double, from_timm(model.state_dict()))
    model.double()
    cfg = Config(activation="relu6", num_classes=10)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 3, 9, 3])
    # fullgraph: a graph break is an error. aot_eager: the graph that Dynamo and AOTAutograd trace from the step,
    # run by eager kernels (Inductor's code generation, a minute and more here, is the bf16 test's).
    step = torch.compile(make_step(cfg, GRADS_OUT), fullgraph=True, backend="aot_eager")
    grads, new_state, _, metrics = step(params, state, {}, (x, y), torch.tensor(0.1))

    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    named = {k: p.grad for k, p in model.named_parameters()} | dict(model.named_buffers())
    ref_grads, _ = from_timm(named)
    ref_grads, ref_state = tree_map(torch.Tensor.double, (ref_grads, from_timm(model.state_dict())[1]))
    assert_trees_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
    assert_trees_close(new_state, ref_state, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(metrics["loss"], loss.detach(), atol=1e-8, rtol=1e-8)


def test_depthwise_filters_receive_gradients_and_change():
    cfg = Config(alpha=0.25, num_classes=3)
    params, state = init(cfg)
    opt = sgd(momentum=0.9)
    step = make_step(cfg, opt)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    new, _, _, _ = step(params, state, opt.init(params), (x, y), torch.tensor(0.1))
    for before, after in zip(params["blocks"], new["blocks"]):
        assert not torch.equal(before["dw"]["weight"], after["dw"]["weight"])


@pytest.mark.parametrize("for_compile", [True, False])
def test_step_does_not_mutate_its_inputs(for_compile):
    cfg = Config(alpha=0.25, num_classes=3)
    params, state = init(cfg)
    opt = rmsprop()
    opt_state = opt.init(params)
    snapshot = tree_map(torch.clone, (params, state, opt_state))
    make_step(cfg, opt, for_compile=for_compile)(params, state, opt_state, (torch.randn(2, 3, 32, 32), torch.tensor([0, 1])),
                        torch.tensor(0.1))
    assert_trees_close((params, state, opt_state), snapshot, atol=0, rtol=0)


def test_weight_decay_skips_depthwise_batchnorm_and_biases():
    params, _ = init(Config(alpha=0.25, num_classes=3))
    mask = decay_mask(params)
    assert mask["stem"]["conv"]["weight"] and mask["blocks"][0]["pw"]["weight"] and mask["fc"]["weight"]
    assert not mask["blocks"][0]["dw"]["weight"] and not mask["fc"]["bias"]
    assert not any(tree_leaves(mask["stem"]["bn"])) and not mask["blocks"][2]["pw_bn"]["weight"]


def _torch_optimizer_matches(ours, make_ref, steps=3, **close):
    torch.manual_seed(0)
    p = {"w": torch.randn(5, 4)}
    ref_p = torch.nn.Parameter(p["w"].clone())
    ref = make_ref([ref_p])
    state = ours.init(p)
    for _ in range(steps):
        g = {"w": torch.randn(5, 4)}
        p, state = ours.update(g, state, p, torch.tensor(0.05))
        ref_p.grad = g["w"].clone()
        ref.step()
    torch.testing.assert_close(p["w"], ref_p.detach(), **close)


def test_sgd_matches_torch_optim():
    _torch_optimizer_matches(sgd(momentum=0.9, nesterov=True),
                             lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True))


def test_adamw_matches_torch_optim_without_decay():
    _torch_optimizer_matches(adamw(), lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.0))


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_optimizers_match_torch_optim_with_masked_weight_decay_on_a_whole_model(name):
    # Every leaf of a real tree, decayed or not (torch.optim with two parameter groups), over three steps.
    # torch's RMSprop has another convention (mean square from 0, eps outside the root): rmsprop is compared with
    # TensorFlow's rule written out in _tf_rmsprop, the decay on exactly the leaves listed here by name.
    params, _ = init(Config(alpha=0.25, num_classes=3), torch.Generator().manual_seed(0))
    leaves, spec = tree_flatten(params)
    mask = tree_leaves(decay_mask(params))
    names = [[getattr(k, "key", None) for k in path] for path, _ in tree_flatten_with_path(params)[0]]
    by_name = [path[-1] == "weight" and path[-2] in ("conv", "pw", "fc") for path in names]
    assert by_name == mask and 0 < sum(mask) < len(mask)
    if name == "rmsprop":
        ours, g = rmsprop(weight_decay=0.01), torch.Generator().manual_seed(1)
        grads_per_step = [[torch.randn(t.shape, generator=g) for t in leaves] for _ in range(3)]
        opt_state = ours.init(params)
        for grads in grads_per_step:
            params, opt_state = ours.update(tree_unflatten(grads, spec), opt_state, params, torch.tensor(0.05))
        expected = _tf_rmsprop(leaves, grads_per_step, 0.05, weight_decay=0.01, decayed=by_name)
        undecayed = _tf_rmsprop(leaves, grads_per_step, 0.05)
        for mine, ref, plain, decays in zip(tree_leaves(params), expected, undecayed, by_name):
            torch.testing.assert_close(mine.double(), ref, atol=1e-6, rtol=1e-5)
            assert decays == (not torch.allclose(ref, plain, atol=1e-7, rtol=0))  # the decay did reach these
            assert mine.is_contiguous()
        return
    refs = [torch.nn.Parameter(t.clone()) for t in leaves]
    groups = [{"params": [r for r, m in zip(refs, mask) if m], "weight_decay": 0.01},
              {"params": [r for r, m in zip(refs, mask) if not m], "weight_decay": 0.0}]
    if name == "sgd":
        ours, ref = sgd(momentum=0.9, nesterov=True, weight_decay=0.01), torch.optim.SGD(
            groups, lr=0.05, momentum=0.9, nesterov=True)
    else:
        ours, ref = adamw(weight_decay=0.01), torch.optim.AdamW(groups, lr=0.05)
    opt_state = ours.init(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in leaves]
        params, opt_state = ours.update(tree_unflatten(grads, spec), opt_state, params, torch.tensor(0.05))
        for r, grad in zip(refs, grads):
            r.grad = grad.clone()
        ref.step()
    for mine, r in zip(tree_leaves(params), refs):
        torch.testing.assert_close(mine, r.detach())
        assert mine.is_contiguous()


def _tf_rmsprop(params, grads_per_step, lr, *, decay=0.9, momentum=0.9, eps=1e-3, weight_decay=0.0, decayed=None):
    """TensorFlow's RMSProp written out leaf by leaf in plain float64 arithmetic, independently of optim.py:
    ms starts at 1; g <- g + wd * p on the decayed leaves (L2 coupled into the gradient);
    ms <- decay ms + (1 - decay) g^2; mom <- momentum mom + lr g / sqrt(ms + eps); p <- p - mom."""
    p = [t.double().clone() for t in params]
    decayed = decayed if decayed is not None else [False] * len(p)
    ms = [torch.ones_like(t) for t in p]
    mom = [torch.zeros_like(t) for t in p]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double() + (weight_decay * p[i] if decayed[i] else 0.0)
            ms[i] = decay * ms[i] + (1 - decay) * g * g
            mom[i] = momentum * mom[i] + lr * g / torch.sqrt(ms[i] + eps)
            p[i] = p[i] - mom[i]
    return p


def test_rmsprop_is_tensorflows():
    # Three steps, so that the momentum buffer and the running mean square both carry over between steps.
    torch.manual_seed(0)
    w = torch.randn(5, 4)
    grads = [torch.randn(5, 4) * (i + 1) for i in range(3)]
    opt = rmsprop(decay=0.9, momentum=0.9, eps=1e-3)
    p, s = {"w": w}, opt.init({"w": w})
    for g in grads:
        p, s = opt.update({"w": g}, s, p, torch.tensor(0.1))
    (expected,) = _tf_rmsprop([w], [[g] for g in grads], 0.1)
    torch.testing.assert_close(p["w"].double(), expected, atol=1e-6, rtol=1e-5)
    # One step written out by hand for one number: ms = 0.9 * 1 + 0.1 * 4, p = 1 - 0.1 * 2 / sqrt(ms + eps).
    one, _ = opt.update({"w": torch.tensor([2.0])}, opt.init({"w": torch.tensor([1.0])}), {"w": torch.tensor([1.0])},
                        torch.tensor(0.1))
    torch.testing.assert_close(one["w"], torch.tensor([1.0 - 0.1 * 2 / (0.9 + 0.4 + 1e-3) ** 0.5]))


def test_schedules():
    cos = make_schedule("cosine", 1.0, 100, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(100) == pytest.approx(0.0)
    assert cos(55) == pytest.approx(0.5)
    step = make_schedule("step", 1.0, 90, decay_every=30, gamma=0.1)
    assert [step(0), step(30), step(89)] == pytest.approx([1.0, 0.1, 0.01])
    assert make_schedule("constant", 0.3, 10)(7) == 0.3


def test_evaluation_runs_batchnorm_in_eval_mode():
    from mobilenet_fn.sources import TensorSource
    from mobilenet_fn.preprocess import normalize, preprocess_for
    from mobilenet_fn.evaluate import evaluate

    cfg = Config(alpha=0.25, num_classes=3, resolution=32)
    params, state = init(cfg)
    state = tree_map(lambda t: t + 0.3, state)  # running statistics that differ from any batch's
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    pre = preprocess_for(32, crop_pct=1.0, stats={"mean": [0.5] * 3, "std": [0.25] * 3})
    result = evaluate(cfg, params, state, TensorSource(images, labels), pre, batch_size=4)
    x = normalize(images.float() / 255, pre)
    logits_eval, _ = apply(cfg, params, state, x, train=False)
    logits_train, _ = apply(cfg, params, state, x, train=True)
    expected_loss = F.cross_entropy(logits_eval, labels).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert abs(F.cross_entropy(logits_train, labels).item() - expected_loss) > 1e-3
    assert result["top1"] == pytest.approx((logits_eval.argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize("head_only", [False, True])
def test_eager_autograd_step_equals_the_torch_func_step(head_only):
    cfg = Config(alpha=0.25, num_classes=5, activation="relu6", dropout=0.0)
    params, state = init(cfg)
    opt = adamw(weight_decay=0.1)
    opt_state = opt.init({"fc": params["fc"]} if head_only else params)
    batch = (torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.tensor([0, 1, 4, 4]))
    lr = torch.tensor(0.01)
    a = make_step(cfg, opt, head_only=head_only, for_compile=True)(params, state, opt_state, batch, lr)
    b = make_step(cfg, opt, head_only=head_only, for_compile=False)(params, state, opt_state, batch, lr)
    assert_trees_close(a, b, atol=1e-6, rtol=1e-5)
    if head_only:
        assert torch.equal(a[0]["blocks"][0]["pw"]["weight"], params["blocks"][0]["pw"]["weight"])


def test_auto_compile_and_cuda_graphs_follow_the_measured_rules():
    auto, cpu, cuda = "auto", torch.device("cpu"), torch.device("cuda")
    assert not use_compile(auto, cpu, 32, images=15 * 4000)  # `make train`: compiling would cost more than it saves
    assert use_compile(auto, cpu, 32, images=20 * 48000)  # 20 epochs of Fashion-MNIST
    assert use_compile(auto, cpu, 128, images=15 * 4000)  # 16x the work per image
    assert use_compile(auto, cuda, 32, images=1000) and not use_compile("off", cuda, 224)
    assert use_cuda_graphs(auto, cuda, 32, 256) and not use_cuda_graphs(auto, cuda, 224, 256)
    assert not use_cuda_graphs(auto, cpu, 32, 256) and not use_cuda_graphs("on", cuda, 32, 256)
    assert use_cuda_graphs("cudagraphs", cuda, 224, 256)


def test_compiled_step_with_cuda_graphs_can_be_fed_its_own_outputs():
    # On the CPU torch.compile runs no graphs, but the wrapper (a new iteration per call, outputs copied) runs.
    def step(p, x):
        return {"w": p["w"] - 0.1 * x * p["w"]}, (p["w"] * x).sum()

    compiled, p, ref = compile_step(step, cuda_graphs=True), {"w": torch.ones(4)}, {"w": torch.ones(4)}
    for i in range(3):
        p, total = compiled(p, torch.full((4,), float(i)))
        ref, ref_total = step(ref, torch.full((4,), float(i)))
        torch.testing.assert_close(p["w"], ref["w"])
        torch.testing.assert_close(total, ref_total)


def test_optimizers_refuse_trees_that_do_not_match_the_params_and_take_decay_without_decayed_leaves():
    params = {"bn": {"weight": torch.ones(3), "bias": torch.zeros(3)}}  # nothing here decays
    grads = {"bn": {"weight": torch.full((3,), 0.5), "bias": torch.full((3,), -0.5)}}
    for make in (sgd, rmsprop, adamw):
        opt, plain = make(weight_decay=0.1), make(weight_decay=0.0)
        new, _ = opt.update(grads, opt.init(params), params, torch.tensor(0.1))
        expected, _ = plain.update(grads, plain.init(params), params, torch.tensor(0.1))
        assert_trees_close(new, expected, atol=0, rtol=0)
        assert not torch.equal(new["bn"]["weight"], params["bn"]["weight"])
        with pytest.raises(ValueError, match="does not match the params"):
            opt.update({"bn": {"weight": torch.ones(3)}}, opt.init(params), params, torch.tensor(0.1))


def test_weight_ema_follows_a_hand_computation_with_timms_warmup():
    from mobilenet_fn.optim import ema, ema_decay

    params = {"w": torch.tensor([1.0, -2.0]), "blocks": [{"b": torch.tensor([3.0])}]}
    state = {"bn": {"mean": torch.tensor([0.5]), "var": torch.tensor([2.0])}}
    average = ema(0.9)
    kept = average.init(params, state)
    expected_p, expected_s = {"w": [1.0, -2.0], "b": 3.0}, {"mean": 0.5, "var": 2.0}
    for t in range(1, 6):
        new_p = {"w": torch.tensor([1.0 + t, -2.0 * t]), "blocks": [{"b": torch.tensor([3.0 - t])}]}
        new_s = {"bn": {"mean": torch.tensor([0.5 * t]), "var": torch.tensor([2.0 + t])}}
        kept = average.update(kept, new_p, new_s)
        d = min(0.9, 1 - (1 + t) ** (-2 / 3))  # timm ModelEmaV3: 1 - (1 + step / gamma)^-power, gamma 1
        expected_p = {"w": [d * expected_p["w"][0] + (1 - d) * (1.0 + t), d * expected_p["w"][1] + (1 - d) * -2.0 * t],
                      "b": d * expected_p["b"] + (1 - d) * (3.0 - t)}
        expected_s = {"mean": d * expected_s["mean"] + (1 - d) * 0.5 * t,
                      "var": d * expected_s["var"] + (1 - d) * (2 + t)}
    torch.testing.assert_close(kept["params"]["w"], torch.tensor(expected_p["w"]))
    torch.testing.assert_close(kept["params"]["blocks"][0]["b"], torch.tensor([expected_p["b"]]))
    torch.testing.assert_close(kept["state"]["bn"]["mean"], torch.tensor([expected_s["mean"]]))
    torch.testing.assert_close(kept["state"]["bn"]["var"], torch.tensor([expected_s["var"]]))
    assert kept["count"].item() == 5
    assert ema_decay(0.9998, torch.tensor(1.0)).item() == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(0.9998, torch.tensor(1e9)).item() == pytest.approx(0.9998)
    assert ema_decay(0.99, torch.tensor(1.0), warmup=False).item() == pytest.approx(0.99)


def test_the_step_keeps_the_ema_of_its_own_updates_and_clips_like_torch():
    from mobilenet_fn.step import averaged, init_opt_state

    cfg = Config(alpha=0.25, num_classes=4)
    params, state = init(cfg, torch.Generator().manual_seed(0))
    batch = (torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1]))
    lr = torch.tensor(0.05)
    opt = sgd(momentum=0.9)
    plain = make_step(cfg, opt)(params, state, opt.init(params), batch, lr)
    with_ema = make_step(cfg, opt, ema_decay=0.5, ema_warmup=False)(
        params, state, init_opt_state(opt, params, state, ema_decay=0.5), batch, lr)
    assert_trees_close(plain[:2], with_ema[:2], atol=0, rtol=0)  # the EMA changes no update
    ema_params, ema_state = averaged(with_ema[2])
    assert_trees_close(ema_params, tree_map(lambda a, b: 0.5 * a + 0.5 * b, params, plain[0]), atol=1e-7, rtol=0)
    assert_trees_close(ema_state, tree_map(lambda a, b: 0.5 * a + 0.5 * b, state, plain[1]), atol=1e-7, rtol=0)
    # Clipping: the gradients the step hands back equal torch.nn.utils.clip_grad_norm_'s on the same tensors.
    grads = make_step(cfg, GRADS_OUT)(params, state, {}, batch, lr)[0]
    clipped, _, _, metrics = make_step(cfg, GRADS_OUT, clip_grad=0.1)(params, state, {}, batch, lr)
    reference = [torch.nn.Parameter(t.clone()) for t in tree_leaves(grads)]
    for p, g in zip(reference, tree_leaves(grads)):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(reference, 0.1)
    assert metrics["grad_norm"].item() == pytest.approx(total.item(), rel=1e-5) and total > 0.1
    for ours, theirs in zip(tree_leaves(clipped), reference):
        torch.testing.assert_close(ours, theirs.grad, atol=1e-7, rtol=1e-5)


def test_the_step_takes_mixed_targets_and_counts_the_dominant_label():
    cfg = Config(alpha=0.25, num_classes=3)
    params, state = init(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1])
    probs = torch.nn.functional.one_hot(labels, 3).float()
    lr = torch.tensor(0.0)
    hard = make_step(cfg, sgd(), label_smoothing=0.1)(params, state, sgd().init(params), (x, labels), lr)
    soft = make_step(cfg, sgd(), label_smoothing=0.1)(params, state, sgd().init(params), (x, probs), lr)
    torch.testing.assert_close(hard[3]["loss"], soft[3]["loss"])
    assert hard[3]["correct"] == soft[3]["correct"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_keep_freed_memory_sets_both_of_glibcs_parameters():
    """On Linux the C library is found and glibc's mallopt accepts both settings (it returns 0 for one it refuses);
    run in a fresh process, since the setting is the process's. Its effect was measured on training runs
    (docs/performance.md, "What makes it fast"): an 8 MiB allocate-and-free loop does not show it."""
    code = "from mobilenet_fn.step import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_compiling_on_a_cpu_only_machine_logs_no_cuda_runtime_notice():
    # Inductor imports torch.utils.cpp_extension, whose search for CUDA logs "No CUDA runtime is found, using
    # CUDA_HOME=..." where a CUDA toolkit is installed but no GPU runs; a compiled CPU run prints only its own lines.
    import logging

    import torch.utils.cpp_extension as cpp_extension

    logger = logging.getLogger("torch.utils.cpp_extension")
    seen = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(catch)
    logger.removeFilter(step_lib.no_cuda_runtime_notice)  # an earlier compile in this process installed it
    try:
        cpp_extension._find_cuda_home()
        if not any(m.startswith("No CUDA runtime is found") for m in seen):
            pytest.skip("torch logs no CUDA notice on this machine (a GPU, or no CUDA toolkit)")
        seen.clear()
        compile_step(abs)
        cpp_extension._find_cuda_home()
        assert seen == []
    finally:
        logger.removeHandler(catch)
        logger.removeFilter(step_lib.no_cuda_runtime_notice)
