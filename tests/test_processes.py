"""Processes: every formula checked against the same formula written out independently here."""

import math

import pytest
import torch
from torch.distributions import Normal

from prefalign.processes import Diffusion, FlowMatching, Process, StepOutput, shift_sigma
from prefalign.sampling import sample_latents

DT = torch.float64


def _data(b=3, shape=(2, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=DT), torch.randn(b, *shape, generator=g, dtype=DT)


def _col(v):
    """A [B] tensor as [B, 1, 1, 1] for 4-D data."""
    return torch.as_tensor(v, dtype=DT).view(-1, 1, 1, 1)


def _ref_alpha_bar(n=1000, start=0.00085, end=0.012, schedule="scaled_linear"):
    if schedule == "linear":
        betas = [start + (end - start) * i / (n - 1) for i in range(n)]
    else:
        betas = [(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (n - 1)) ** 2 for i in range(n)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return out


# ----------------------------------------------------------------------------------------------- flow matching


def test_flow_noise_target_model_time_and_x0():
    p = FlowMatching()
    x0, eps = _data()
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=DT)
    x_t = p.noise(x0, eps, sigma)
    torch.testing.assert_close(x_t, (1 - _col(sigma)) * x0 + _col(sigma) * eps)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(p.target(x0, eps, sigma), eps - x0)
    torch.testing.assert_close(p.model_time(sigma), torch.tensor([0.0, 300.0, 1000.0]))
    torch.testing.assert_close(p.predict_x0(eps - x0, x_t, sigma), x0)
    # A 0-dim t broadcasts over the batch.
    torch.testing.assert_close(p.noise(x0, eps, torch.tensor(0.3)), 0.7 * x0 + 0.3 * eps)


def test_flow_bad_t_shape_is_a_clear_error():
    x0, eps = _data()
    with pytest.raises(ValueError, match="shape"):
        FlowMatching().noise(x0, eps, torch.rand(5))


def test_flow_euler_step():
    p = FlowMatching()
    x, v = _data()
    t, t_next = torch.tensor([0.9, 0.5, 0.2], dtype=DT), torch.tensor([0.7, 0.25, 0.0], dtype=DT)
    out = p.step(v, x, t, t_next)
    assert isinstance(out, StepOutput)
    torch.testing.assert_close(out.sample, x + (_col(t_next) - _col(t)) * v)
    torch.testing.assert_close(out.mean, out.sample)
    assert out.std.shape == (3, 1, 1, 1) and bool((out.std == 0).all())
    with pytest.raises(ValueError, match="deterministic"):
        p.step(v, x, t, t_next, noise=torch.randn_like(x))


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_flow_ode_with_exact_velocity_reaches_a_point_mass(shift):
    p = FlowMatching(shift=shift)
    c = torch.tensor([1.5, -2.0], dtype=DT)
    # For data = c, x_σ = (1 − σ)c + σ·eps, so v = eps − c = (x − c)/σ.
    model = lambda x, tm: (x - c) / (tm / 1000).to(DT).view(-1, 1)  # noqa: E731
    x = sample_latents(lambda x, tm, cond: model(x, tm), p, {}, torch.randn(8, 2, dtype=DT), 7).latents
    torch.testing.assert_close(x, c.expand(8, 2))


def _ref_flow_grpo(x, v, s, sn, a):
    """Flow-GRPO's SDE step written out for scalar σ (σ = 1 uses 1 − σ_next in std_t)."""
    dt = sn - s
    std_t = a * math.sqrt(s / (1 - (sn if s == 1 else s)))
    mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * math.sqrt(-dt)


def test_flow_grpo_sde_step_mean_and_std_including_the_first_step():
    a = 0.7
    p = FlowMatching(noise_level=a)
    x, v = _data()
    t = torch.tensor([1.0, 0.6, 0.1], dtype=DT)
    t_next = torch.tensor([0.9, 0.4, 0.0], dtype=DT)
    eps = torch.randn_like(x)
    out = p.step(v, x, t, t_next, stochastic=True, noise=eps)
    for i in range(3):
        mean, std = _ref_flow_grpo(x[i], v[i], t[i].item(), t_next[i].item(), a)
        torch.testing.assert_close(out.mean[i], mean)
        assert out.std[i].item() == pytest.approx(std, rel=1e-12)
    # σ = 1: std_t = a·sqrt(1/(1 − σ_next)), and the velocity's extra term vanishes with (1 − σ).
    assert out.std[0].item() == pytest.approx(a * math.sqrt(1 / 0.1) * math.sqrt(0.1))
    assert torch.isfinite(out.mean).all()
    torch.testing.assert_close(out.sample, out.mean + out.std * eps)


def test_flow_sde_noise_comes_from_the_generator():
    p = FlowMatching()
    x, v = _data()
    one = p.step(v, x, 0.5, 0.4, stochastic=True, generator=torch.Generator().manual_seed(3))
    two = p.step(v, x, 0.5, 0.4, stochastic=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(one.sample, two.sample)
    assert not torch.allclose(one.sample, one.mean)


def test_cps_step_mean_and_std():
    a = 0.6
    p = FlowMatching(sde="cps", noise_level=a)
    x, v = _data()
    s, sn = 0.8, 0.5
    out = p.step(v, x, torch.tensor(s), torch.tensor(sn), stochastic=True)
    std = sn * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    torch.testing.assert_close(out.mean, (1 - sn) * x0_hat + math.sqrt(sn**2 - std**2) * x1_hat)
    assert torch.allclose(out.std, torch.full((3, 1, 1, 1), std, dtype=DT))
    with pytest.raises(ValueError):
        FlowMatching(sde="cps", noise_level=1.5)


def test_cps_preserves_the_coefficients_of_a_point_mass():
    # With the exact velocity of data = c, x̂0 = c and x̂1 = eps, so every CPS step lands on (1 − σ)·c + σ·(unit noise).
    p = FlowMatching(sde="cps", noise_level=0.7)
    c = torch.tensor([1.5, -2.0], dtype=DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g, dtype=DT)
    ts = p.timesteps(6).double()
    for s, sn in zip(ts[:-2], ts[1:-1]):
        x = p.step((x - c) / s, x, s, sn, stochastic=True, generator=g).sample
        z = (x - (1 - sn) * c) / sn
        torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=DT), atol=0.03, rtol=0)
        torch.testing.assert_close(z.std(0), torch.ones(2, dtype=DT), atol=0.03, rtol=0)
    last = p.step((x - c) / ts[-2], x, ts[-2], ts[-1], stochastic=True, generator=g)
    assert bool((last.std == 0).all())
    torch.testing.assert_close(last.sample, c.expand_as(x))


def test_flow_schedule_is_monotone_from_noise_to_data_and_shifted():
    for shift in (1.0, 3.0, 5.0):
        ts = FlowMatching(shift=shift).timesteps(10)
        assert ts.shape == (11,) and ts.dtype == torch.float32
        assert ts[0] == 1 and ts[-1] == 0
        assert bool((ts[1:] < ts[:-1]).all())
    plain = torch.linspace(1, 0, 11, dtype=DT)
    torch.testing.assert_close(FlowMatching(shift=5.0).timesteps(10).double(), 5 * plain / (1 + 4 * plain),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(FlowMatching().timesteps(10).double(), plain, atol=1e-7, rtol=0)


def test_shift_map():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=DT)
    torch.testing.assert_close(shift_sigma(s, 3.0), torch.tensor([0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0], dtype=DT))
    torch.testing.assert_close(shift_sigma(s, 1.0), s)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.8, 0.5)])
def test_logit_normal_samples_lie_in_the_unit_interval_with_the_right_median(mean, std):
    p = FlowMatching(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std)
    t = p.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert bool(((t > 0) & (t < 1)).all())
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)


def test_shifted_and_uniform_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    t = FlowMatching(timestep_sampling="shifted", shift=3.0).sample_t(20000, generator=g)
    assert bool(((t >= 0) & (t < 1)).all())
    assert t.median().item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.01)
    u = FlowMatching().sample_t(20000, generator=g)
    assert u.median().item() == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------------------------- diffusion


def test_alpha_bar_table_and_terminal():
    for schedule, start, end in (("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)):
        p = Diffusion(beta_schedule=schedule, beta_start=start, beta_end=end)
        ref = _ref_alpha_bar(1000, start, end, schedule)
        t = torch.tensor([0.0, 10.0, 500.0, 999.0])
        torch.testing.assert_close(p.alpha_bar(t), torch.tensor([ref[0], ref[10], ref[500], ref[999]], dtype=DT))
        assert p.alpha_bar(torch.tensor(-1.0)).item() == 1.0
    with pytest.raises(ValueError, match="integers"):
        p.alpha_bar(torch.tensor([3.5]))
    with pytest.raises(ValueError, match=r"\[-1, 1000\)"):
        p.alpha_bar(torch.tensor([1000.0]))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_noise_target_and_x0(prediction):
    p = Diffusion(prediction=prediction)
    x0, eps = _data()
    t = torch.tensor([0.0, 421.0, 999.0])
    ref = _ref_alpha_bar()
    abar = _col([ref[0], ref[421], ref[999]])
    x_t = p.noise(x0, eps, t)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    target = p.target(x0, eps, t)
    expected = eps if prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(p.predict_x0(target, x_t, t), x0)
    torch.testing.assert_close(p.model_time(t), t)
    assert p.model_time(t).dtype == torch.float32


def test_diffusion_sample_t_are_integers_in_range():
    t = Diffusion(num_train_timesteps=50).sample_t(5000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (5000,)
    assert bool((t == t.round()).all()) and t.min() == 0 and t.max() == 49


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_deterministic_step_with_the_true_noise_recovers_x0(prediction):
    p = Diffusion(prediction=prediction)
    x0, eps = _data()
    t = torch.tensor([999.0, 500.0, 3.0])
    x_t = p.noise(x0, eps, t)
    out = p.step(p.target(x0, eps, t), x_t, t, torch.tensor(-1.0))
    torch.testing.assert_close(out.sample, x0)
    assert bool((out.std == 0).all())
    # An intermediate deterministic step lands on the forward marginal with the same noise.
    t_next = torch.tensor([749.0, 249.0, 1.0])
    torch.testing.assert_close(p.step(p.target(x0, eps, t), x_t, t, t_next).sample, p.noise(x0, eps, t_next))


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_stochastic_step_sigma_and_mean(eta):
    p = Diffusion(eta=eta)
    x_t, pred = _data()
    t, t_next = torch.tensor([999.0, 600.0, 40.0]), torch.tensor([749.0, 300.0, 20.0])
    ref = _ref_alpha_bar()
    a = _col([ref[999], ref[600], ref[40]])
    an = _col([ref[749], ref[300], ref[20]])
    sigma = eta * ((1 - an) / (1 - a)).sqrt() * (1 - a / an).sqrt()
    x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    noise = torch.randn_like(x_t)
    out = p.step(pred, x_t, t, t_next, stochastic=True, noise=noise)
    torch.testing.assert_close(out.std, sigma)
    torch.testing.assert_close(out.mean, an.sqrt() * x0_hat + (1 - an - sigma**2).sqrt() * pred)
    torch.testing.assert_close(out.sample, out.mean + sigma * noise)
    # eta = 1 is the DDPM posterior variance (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t for adjacent timesteps.
    if eta == 1.0:
        tt, tn = torch.tensor(500.0), torch.tensor(499.0)
        beta = 1 - ref[500] / ref[499]
        var = (1 - ref[499]) / (1 - ref[500]) * beta
        std = p.step(pred, x_t, tt, tn, stochastic=True).std
        torch.testing.assert_close(std, torch.full_like(std, math.sqrt(var)))


def test_ddim_last_step_is_deterministic_even_when_stochastic():
    p = Diffusion()
    x_t, pred = _data()
    out = p.step(pred, x_t, torch.tensor(249.0), torch.tensor(-1.0), stochastic=True)
    assert bool((out.std == 0).all())
    torch.testing.assert_close(out.sample, p.predict_x0(pred, x_t, torch.tensor(249.0)))


def test_diffusion_schedules():
    for spacing, expected in (("trailing", [999, 749, 499, 249, -1]), ("leading", [750, 500, 250, 0, -1])):
        ts = Diffusion(timestep_spacing=spacing).timesteps(4)
        assert ts.tolist() == expected and ts.dtype == torch.float32
    for n in (1, 3, 7, 50, 1000):
        ts = Diffusion().timesteps(n)
        assert ts.shape == (n + 1,)
        assert ts[0] == 999 and ts[-1] == -1, "trailing starts at the noisiest timestep and ends clean"
        assert bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError):
        Diffusion().timesteps(0)


def test_diffusion_schedule_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    for spacing in ("trailing", "leading"):
        ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            timestep_spacing=spacing)
        ref.set_timesteps(20)
        ours = Diffusion(timestep_spacing=spacing)
        assert ours.timesteps(20)[:-1].long().tolist() == ref.timesteps.tolist()
        torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="eta"):
        Diffusion(eta=1.5)
    with pytest.raises(ValueError, match="beta_schedule"):
        Diffusion(beta_schedule="cosine")
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(shift=0.0)
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatching(timestep_sampling="beta")


# ----------------------------------------------------------------------------------------------- log-prob


def _ref_log_prob(sample, mean, std):
    return Normal(mean.double(), std.double()).log_prob(sample.double()).flatten(1).mean(1)


def test_log_prob_equals_an_independent_gaussian_density():
    sample, mean = _data(b=4)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DT)
    expected = _ref_log_prob(sample, mean, _col(std).expand_as(sample))
    torch.testing.assert_close(Process.log_prob(sample, mean, std), expected)  # std as [B]
    torch.testing.assert_close(Process.log_prob(sample, mean, _col(std)), expected)  # broadcastable
    full = torch.rand_like(sample) + 0.1
    torch.testing.assert_close(FlowMatching().log_prob(sample, mean, full), _ref_log_prob(sample, mean, full))
    torch.testing.assert_close(Process.log_prob(sample, mean, 0.3),
                               _ref_log_prob(sample, mean, torch.full_like(sample, 0.3)))


def test_a_masked_log_prob_is_the_density_of_the_masked_elements_alone():
    sample, mean = _data(b=3)
    std = torch.tensor([0.2, 0.5, 1.5], dtype=DT)
    mask = (torch.rand(sample.shape[0], 1, *sample.shape[2:]) > 0.6).to(DT)
    mask[2] = 0  # an empty region: no density, 0
    got = Process.log_prob(sample, mean, std, mask)
    for i in range(2):
        inside = mask[i].expand_as(sample[i]).bool()
        expected = Normal(mean[i][inside].double(), std[i].double()).log_prob(sample[i][inside].double()).mean()
        torch.testing.assert_close(got[i], expected.to(got.dtype))
    assert float(got[2]) == 0.0
    torch.testing.assert_close(Process.log_prob(sample, mean, std, torch.ones_like(sample)),
                               Process.log_prob(sample, mean, std))


@pytest.mark.parametrize("process", [FlowMatching(), FlowMatching(sde="cps"), Diffusion(prediction="v")])
def test_log_prob_of_a_stochastic_step(process):
    x, pred = _data()
    t, t_next = process.timesteps(5)[1:3]
    out = process.step(pred, x, t, t_next, stochastic=True, generator=torch.Generator().manual_seed(0))
    lp = process.log_prob(out.sample, out.mean, out.std)
    assert lp.shape == (3,)
    torch.testing.assert_close(lp, _ref_log_prob(out.sample, out.mean, out.std.expand_as(out.sample)))
    # The same policy scoring its own step gives ratio exactly 1 (the first GRPO inner pass).
    again = process.step(pred, x, t, t_next, stochastic=True, noise=torch.zeros_like(x))
    assert torch.equal(process.log_prob(out.sample, again.mean, again.std), lp)


def test_log_prob_is_float32_for_bf16_inputs():
    sample, mean = (z.to(torch.bfloat16) for z in _data())
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.bfloat16)
    lp = Process.log_prob(sample, mean, std)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), _ref_log_prob(sample, mean, _col(std.double()).expand_as(sample)),
                               atol=1e-5, rtol=1e-5)


def test_log_prob_of_a_deterministic_step_is_an_error():
    x, v = _data()
    out = FlowMatching().step(v, x, 0.5, 0.4)
    with pytest.raises(ValueError, match="std > 0"):
        Process.log_prob(out.sample, out.mean, out.std)


def test_steps_compute_in_float32_for_bf16_inputs():
    x, v = (z.to(torch.bfloat16) for z in _data())
    for p in (FlowMatching(), Diffusion()):
        t, t_next = p.timesteps(4)[1:3]
        out = p.step(v, x, t, t_next, stochastic=True)
        assert out.sample.dtype == out.mean.dtype == out.std.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- sampling a Gaussian

MU = torch.tensor([2.0, -1.0], dtype=DT)
S = torch.tensor([0.5, 1.5], dtype=DT)


def _flow_velocity(x, model_time):
    """Exact velocity E[eps − x0 | x_σ] for data N(MU, diag S²)."""
    s = (model_time / 1000).to(DT).view(-1, 1)
    var = (1 - s) ** 2 * S**2 + s**2
    r = x - (1 - s) * MU
    return s / var * r - (MU + (1 - s) * S**2 / var * r)


def _diffusion_eps(process):
    def eps(x, model_time):
        abar = process.alpha_bar(model_time).view(-1, 1)
        var = abar * S**2 + 1 - abar
        return (1 - abar).sqrt() / var * (x - abar.sqrt() * MU)
    return eps


@pytest.mark.parametrize("process, model, steps, stochastic", [
    (FlowMatching(), _flow_velocity, 100, False),
    (FlowMatching(shift=3.0), _flow_velocity, 100, True),
    # DDPM's linear betas reach ᾱ ≈ 4e-5, so the standard-normal prior is (almost) exact.
    (p := Diffusion(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), _diffusion_eps(p), 200, False),
    (p, _diffusion_eps(p), 200, True),
])
def test_sampling_a_gaussian_with_the_exact_model_gives_its_mean_and_std(process, model, steps, stochastic):
    g = torch.Generator().manual_seed(0)
    z = process.prior((4000, 2), generator=g, dtype=DT)
    z = (z - z.mean(0)) / z.std(0)  # an exactly standard start, so that only the sampler's error remains
    x = sample_latents(lambda x, tm, cond: model(x, tm), process, {}, z, steps, g, stochastic=stochastic).latents
    torch.testing.assert_close(x.mean(0), MU, atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(0), S, atol=0.05, rtol=0.03)


def test_processes_configure_from_yaml_through_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--process", type=Process)
    cfg = parser.parse_string(
        "process:\n  class_path: prefalign.processes.FlowMatching\n  init_args: {shift: 5.0, sde: cps}\n")
    process = parser.instantiate(cfg).process
    assert isinstance(process, FlowMatching) and process.shift == 5.0 and process.sde == "cps"
    cfg = parser.parse_string("process:\n  class_path: prefalign.processes.Diffusion\n  init_args: {prediction: v}\n")
    assert parser.instantiate(cfg).process.prediction == "v"
    with pytest.raises(BaseException):
        parser.parse_string("process:\n  class_path: prefalign.processes.FlowMatching\n  init_args: {sde: ode}\n")
