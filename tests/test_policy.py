"""The narrow contract: algorithms see a Policy, and their losses and steps run on a plain one, without Lightning;
the one sampler behaves the same whatever it records."""

import torch

from prefalign.algorithms import GRPO, SFT, DiffusionDPO, ReFree
from prefalign.algorithms.base import repeat_conditions
from prefalign.module import AlignmentModule
from prefalign.policy import Policy
from prefalign.processes import Diffusion, FlowMatching
from prefalign.rewards import SyncExpert
from prefalign.sampling import sample_latents

from conftest import tiny_wan


def _loss(algorithm, policy, batch):
    """The loss under seeded noise (and ReFree's negatives, drawn from its own generator)."""
    torch.manual_seed(0)
    if isinstance(algorithm, ReFree):
        algorithm.generator.manual_seed(0)
    return algorithm.loss(policy, batch)[0]


def test_losses_on_a_plain_policy_equal_the_modules(clip_batch):
    """SFT, DPO and ReFree compute the same loss on a plain Policy (no trainer, no LightningModule) as on the policy
    the module hands them, under full fine-tuning with the starting model as the reference."""
    pairs = dict(clip_batch, rejected=clip_batch["video"].flip(1))
    cases = [(SFT(), clip_batch), (DiffusionDPO(beta=500.0), pairs),
             (ReFree(negatives={"jitter": 1.0, "freeze": 1.0}), clip_batch)]
    for algorithm, batch in cases:
        torch.manual_seed(0)
        module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=algorithm)
        plain = Policy(module.denoiser, module.process)
        if algorithm.needs_reference:
            module.refresh_reference()
            plain.refresh_reference()
        expected = _loss(algorithm, module.policy, batch)
        got = _loss(algorithm, plain, batch)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_grpo_steps_a_plain_policy(clip_batch):
    """GRPO's manual optimization through the contract alone: a plain Policy with an optimizer takes the step, the
    first pass is on policy (ratio 1), and the trained weights move."""
    torch.manual_seed(0)
    denoiser = tiny_wan()
    optimizer = torch.optim.SGD([p for p in denoiser.parameters() if p.requires_grad], lr=1e-2)
    policy = Policy(denoiser, FlowMatching(), optimizer=optimizer, global_step=3, global_rank=0)
    grpo = GRPO(SyncExpert(), group_size=2, num_steps=3, train_fraction=1.0, clip_range=0.2)
    before = [p.detach().clone() for p in denoiser.parameters()]
    batch = {k: v[:2] if torch.is_tensor(v) or isinstance(v, list) else v for k, v in clip_batch.items()}
    logged = grpo.training_step(policy, batch)
    assert abs(float(logged["ratio"]) - 1.0) < 1e-5
    assert float(logged["trained_steps"]) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, denoiser.parameters()))


def test_a_plain_policy_without_an_optimizer_or_reference_says_so():
    policy = Policy(tiny_wan(), FlowMatching())
    for call in (policy.optimizer_step, policy.zero_grad):
        try:
            call()
        except RuntimeError as error:
            assert "optimizer" in str(error)
        else:
            raise AssertionError("a policy without an optimizer stepped")
    try:
        with policy.reference():
            pass
    except RuntimeError as error:
        assert "refresh_reference" in str(error)
    else:
        raise AssertionError("a policy without a reference gave one")


def test_the_sampler_gives_the_same_sample_whatever_it_records(clip_batch):
    """Recording states and log-probs does not change a single value of the sample (the same noise is drawn in the
    same order), and the recorded states end with it; micro-batching the forwards changes only the float rounding of
    batched matrix products."""
    torch.manual_seed(0)
    denoiser = tiny_wan()
    batch = repeat_conditions({k: v[:2] for k, v in clip_batch.items() if torch.is_tensor(v)}, 2)
    for process in (FlowMatching(), Diffusion(prediction="v", eta=1.0)):
        cond = denoiser.condition(batch, 17)
        shape = (4, *denoiser.latent_shape(17, 32, 32))

        def run(**options):
            x = process.prior(shape, generator=torch.Generator().manual_seed(1))
            return sample_latents(denoiser, process, cond, x, 3, torch.Generator().manual_seed(2), stochastic=True,
                                  drop=denoiser.drop_conditions, **options)

        plain, recorded, split = run(), run(record=True, keep_means=True), run(micro_batch=3)
        assert plain.states is None and plain.log_probs is None
        assert torch.equal(plain.latents, recorded.latents)
        torch.testing.assert_close(split.latents, plain.latents, rtol=1e-4, atol=1e-4)
        assert recorded.states.shape == (4, *shape) and torch.equal(recorded.states[-1], plain.latents)
        stochastic = torch.isfinite(recorded.log_probs).all(dim=1)
        assert stochastic.any() and set(recorded.means) == {j for j in range(3) if stochastic[j]}
