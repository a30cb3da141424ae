"""The BN loss machinery of synthesis: fast moments, hooks, early stop, schedule, config checks."""

from __future__ import annotations

import pytest
import torch

import hub_dfq
from hub_dfq.bnstats import batch_moments, gaussian_kl
from hub_dfq.errors import ConfigError
from hub_dfq.synth.bns import StatsBatchNorm, StopForward, bn_loss, swap_batchnorms
from hub_dfq.synth.config import Priors, Regularizers, SynthConfig
from hub_dfq.synth.priors import cosine_lr, jitter_flip, pink_noise, total_variation, white_noise


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_moments_match_var_mean_and_gradcheck(layout):
    x = (torch.randn(4, 5, 6, 7, dtype=torch.float64) * 3 + 2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    mean, var = batch_moments(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    assert torch.autograd.gradcheck(batch_moments, (x,))


def test_batch_moments_of_bf16_are_float32():
    x = torch.randn(8, 3, 4, 4).bfloat16().requires_grad_(True)
    mean, var = batch_moments(x)
    assert mean.dtype == var.dtype == torch.float32
    (mean.sum() + var.sum()).backward()
    assert x.grad.dtype == torch.bfloat16


def test_bn_loss_hooks_sum_layer_kl_and_are_removed():
    model = hub_dfq.load_model("default")
    x = torch.randn(4, 3, 32, 32)
    with bn_loss(model.bn_layers, loss="kl") as state:
        state.reset()
        model.module(x)
        total = state.total()
        per_layer = state.per_layer()
    assert list(per_layer) == [name for name, _ in model.bn_layers]
    # reference: capture inputs with plain hooks and the textbook formula
    from hub_dfq.bnstats import capture_bn_inputs

    with capture_bn_inputs(model.bn_layers) as slots:
        model.module(x)
    ref = sum(gaussian_kl(bn.running_mean, bn.running_var, *reversed(torch.var_mean(a, dim=(0, 2, 3), correction=0))).mean()
              for (_, bn), a in zip(model.bn_layers, slots))
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    assert all(not bn._forward_pre_hooks for _, bn in model.bn_layers)


def test_affine_moments_gradcheck():
    from hub_dfq.bnstats import affine_moments

    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: affine_moments(t, scale, shift), (x.requires_grad_(True),))


def test_swapped_batchnorms_give_the_same_loss_output_and_input_gradient():
    """The loop's one-node BN (output + moments) against the model's BN read through hooks."""
    import copy

    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = hub_dfq.load_model("default")
    names = [name for name, _ in model.bn_layers]
    swapped = swap_batchnorms(copy.deepcopy(model.module), names)
    layers = [(name, swapped.get_submodule(name)) for name in names]
    assert all(isinstance(layer, StatsBatchNorm) for _, layer in layers)

    def run(module, bns):
        x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x.requires_grad_(True)
        with bn_loss(bns) as state:
            state.reset()
            logits = module(x)
            loss = state.total() + logits.square().mean()  # gradient through both BN outputs and moments
        loss.backward()
        return logits.detach(), float(loss.detach()), x.grad

    module = copy.deepcopy(model.module).double()
    ref = run(module, [(n, module.get_submodule(n)) for n in names])
    got = run(swapped.double(), layers)
    # scale/shift are float32 (the model's precision); the reference runs the BN in float64
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1] == pytest.approx(ref[1], rel=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-6)
    assert all(layer.sink is None for _, layer in layers)  # detached on exit: a plain BN again
    # timm's BN+activation keeps its activation; a BN with its own forward is read by a hook instead
    act = BatchNormAct2d(4, act_layer=torch.nn.ReLU).eval()

    class DoubledBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    holder = torch.nn.Sequential(act, DoubledBN(4).eval())
    swap_batchnorms(holder, ["0", "1"])
    assert isinstance(holder[0], StatsBatchNorm) and isinstance(holder[0].after, torch.nn.ReLU)
    assert not isinstance(holder[1], StatsBatchNorm)


def test_stop_after_last_bn_layer():
    model = hub_dfq.load_model("default")
    with bn_loss(model.bn_layers, stop_after_last=True) as state:
        with pytest.raises(StopForward):
            model.module(torch.randn(2, 3, 32, 32))
        assert len(state.terms) == len(model.bn_layers)


def test_cosine_schedule_warms_up_and_decays():
    lrs = [cosine_lr(s, 100, base=1.0, warmup=0.05) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 0.03 and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_priors_are_reproducible():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = jitter_flip(x, jitter=2, flip=True, generator=torch.Generator().manual_seed(1))
    b = jitter_flip(x, jitter=2, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert total_variation(torch.ones(1, 3, 4, 4)) == 0


def _lag_correlation(x: torch.Tensor, lag: int) -> float:
    return float(torch.corrcoef(torch.stack([x[..., :, lag:].flatten(), x[..., :, :-lag].flatten()]))[0, 1])


def test_pink_noise_has_a_photographs_correlations_and_white_noise_none():
    """Pink noise: unit variance per image and channel, neighbouring pixels (and pixels 8 apart) strongly correlated,
    colour channels correlated at 0.8; white noise: none of it. Both are drawn from the generator alone."""
    pink = pink_noise((4, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    white = white_noise((4, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pink.std((2, 3)), torch.ones(4, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(pink.mean((2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)
    assert _lag_correlation(pink, 1) > 0.8 and _lag_correlation(pink, 8) > 0.2
    assert abs(_lag_correlation(white, 1)) < 0.05
    channels = torch.corrcoef(pink.transpose(0, 1).flatten(1))
    off_diagonal = channels[~torch.eye(3, dtype=torch.bool)]
    assert 0.7 < float(off_diagonal.min()) and float(off_diagonal.max()) < 0.9, channels
    again = pink_noise((4, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pink, again)
    gray = pink_noise((2, 1, 31, 33), generator=torch.Generator().manual_seed(0))  # odd sides, one channel
    assert gray.shape == (2, 1, 31, 33) and _lag_correlation(gray, 1) > 0.6


def test_the_start_noise_defaults_to_the_methods_own_and_keeps_earlier_keys():
    """bns+p starts from pink noise, the paper's methods from white; a white start is not stored, so the settings (and
    cache keys) of runs from before the setting existed are unchanged; a pink one is stored and read back."""
    assert SynthConfig(method="bns+p", num_images=4).regularizers.noise == "pink"
    for method in ("bns", "bns+i", "inception", "gaussian"):
        config = SynthConfig(method=method, num_images=4)
        assert config.regularizers.noise == "white" and "noise" not in config.to_dict()["priors"]
    assert SynthConfig.from_dict(SynthConfig(method="bns", num_images=4).to_dict()).regularizers.noise == "white"
    pink = SynthConfig(method="bns", num_images=4, regularizers=Regularizers(noise="pink"))
    assert pink.to_dict()["priors"]["noise"] == "pink" and SynthConfig.from_dict(pink.to_dict()) == pink
    white = SynthConfig(method="bns+p", num_images=4, regularizers=Regularizers(noise="white"))
    assert SynthConfig.from_dict(white.to_dict()) == white
    with pytest.raises(ConfigError, match="unknown noise 'brown': use one of white, pink"):
        SynthConfig(method="bns", num_images=4, regularizers=Regularizers(noise="brown"))


def test_config_defaults_and_checks():
    config = SynthConfig(method="bns", num_images=100, batch_size=32, shard_size=50)
    assert config.iters == 200 and config.lr == 1.0 and config.shard_size == 64 and config.num_shards == 2
    assert list(config.shard_rows(1)) == list(range(64, 100))
    assert SynthConfig(method="gaussian", num_images=3, iters=50).iters == 0
    with pytest.raises(ConfigError, match="learning rate"):
        SynthConfig(method="bns", num_images=3, lr=float("nan"))
    with pytest.raises(ConfigError, match="precision"):
        SynthConfig(method="bns", num_images=3, precision="fp8")
    assert SynthConfig.from_dict(config.to_dict()) == config


def test_regularizers_and_warmup_keep_the_stored_priors_mapping():
    """generation.json and cache keys store both as "priors", in the order of before; the old names still work."""
    config = SynthConfig(method="bns+i", num_images=4, regularizers=Regularizers(ce_weight=0.25), warmup=0.1)
    stored = config.to_dict()
    assert list(stored) == ["method", "num_images", "iters", "batch_size", "loss", "lr", "seed", "shard_size",
                            "precision", "priors"]
    assert list(stored["priors"].items()) == [("tv_weight", 0.05), ("l2_weight", 1e-3), ("jitter", None),
                                              ("flip", True), ("ce_weight", 0.25), ("warmup", 0.1)]
    assert SynthConfig.from_dict(stored) == config
    with pytest.warns(FutureWarning, match="priors"):
        old = SynthConfig(method="bns+i", num_images=4, priors=Priors(ce_weight=0.25, warmup=0.1))
    assert old == config and old.to_dict() == stored
    with pytest.raises(ConfigError, match="twice"):
        SynthConfig(method="bns", num_images=4, warmup=0.2, regularizers=Priors(warmup=0.1))


def test_tv_weight_defaults_to_the_methods_own():
    """Each method's total-variation weight unless one is given: the stored settings (and cache keys) of the methods
    from before bns+p are unchanged."""
    assert SynthConfig(method="inception", num_images=4).regularizers.tv_weight == 0.05
    assert SynthConfig(method="bns", num_images=4).regularizers.tv_weight == 0.05
    assert SynthConfig(method="bns+p", num_images=4).regularizers.tv_weight == 8.0
    given = SynthConfig(method="bns+p", num_images=4, regularizers=Regularizers(tv_weight=2.0))
    assert given.regularizers.tv_weight == 2.0 and SynthConfig.from_dict(given.to_dict()) == given
    with pytest.raises(ConfigError, match="tv_weight"):
        SynthConfig(method="bns+p", num_images=4, regularizers=Regularizers(tv_weight=-1.0))


def test_affine_moments_with_a_clamp_is_bn_then_relu6_in_one_node():
    """A timm BN+ReLU6 runs as one autograd node in the loop: same output and input gradient as the two layers."""
    from hub_dfq.bnstats import affine_moments

    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 4).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: affine_moments(t, scale, shift, (0.0, 6.0)), (x.requires_grad_(True),))
    grad_y = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y, mean, var = affine_moments(x, scale, shift, (0.0, 6.0))
    (y * grad_y).sum().add(mean.sum() + var.sum()).backward()
    got, x.grad = x.grad, None
    ref_y = torch.nn.functional.relu6(x * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1))
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    (ref_y * grad_y).sum().add(ref_mean.sum() + ref_var.sum()).backward()
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(got, x.grad)


@pytest.mark.parametrize("groups,stride,size", [(8, 2, (15, 16)), (8, 2, (14, 14)), (1, 2, (14, 15)), (8, 1, (9, 9))],
                         ids=["dw-s2-odd", "dw-s2-even", "dense-s2", "dw-s1"])
def test_loop_convs_compute_timms_same_padding_exactly(groups, stride, size):
    from timm.layers import Conv2dSame

    from hub_dfq.synth.loop_convs import LoopConv2d, prepare_loop_convs

    torch.manual_seed(0)
    conv = Conv2dSame(8, 8, 3, stride=stride, groups=groups)
    x = torch.randn(2, 8, *size)
    assert torch.equal(LoopConv2d(conv, torch.float32, tf_same=True)(x), conv(x))
    holder = prepare_loop_convs(torch.nn.Sequential(conv), "fp32", torch.device("cpu"))
    assert isinstance(holder[0], LoopConv2d) and holder[0].dtype == torch.float32
    # bf16 loops keep the strided depthwise convs in float32 on a CPU (oneDNN's bf16 kernels are slow there)
    low = prepare_loop_convs(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, stride=stride, groups=groups)), "bf16",
                             torch.device("cpu"))
    strided_depthwise = groups == 8 and stride == 2
    assert isinstance(low[0], LoopConv2d) == strided_depthwise


def test_reverse_kl_uses_the_layers_own_eps_and_reports_the_papers_kl(tmp_path):
    import json

    from hub_dfq.synth.bns import reverse_kl_term

    running_mean, running_var = torch.tensor([0.0, 1.0]), torch.tensor([1e-6, 2.0])
    mean, var = torch.tensor([0.1, 1.0]), torch.tensor([0.0, 2.0])
    expected = gaussian_kl(mean, var, running_mean, running_var, eps=1e-3).mean()
    assert reverse_kl_term(running_mean, running_var, mean, var, eps=1e-3) == pytest.approx(float(expected))
    # a dead batch channel against a tiny running variance: bounded, where the paper's direction explodes
    assert float(reverse_kl_term(running_mean, running_var, mean, var, eps=1e-3)) < 10
    assert float(gaussian_kl(running_mean, running_var, mean, var).mean()) > 10

    model = hub_dfq.load_model("default")
    eps = {name: bn.eps for name, bn in model.bn_layers}
    with bn_loss(model.bn_layers, loss="rkl") as state:
        assert state._eps == list(eps.values())
    hub_dfq.synthesize(model, "bns", 4, iters=3, batch_size=4, loss="rkl", out_dir=tmp_path / "d", progress=False)
    divergence = json.loads((tmp_path / "d" / "generation.json").read_text())["bn_divergence"]
    assert divergence["metric"] == "kl" and divergence["loss"] == "rkl"
    assert divergence["end"]["total"] < divergence["start"]["total"]
