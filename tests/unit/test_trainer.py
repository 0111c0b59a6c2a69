"""The adversarial step and the loop on one process (the 2-process behaviour is in tests/distributed)."""

import pytest
import torch

from distgan.checkpoint import CheckpointManager
from support import make_trainer, params


def adam_steps(opt) -> int:
    return int(next(iter(opt.state.values()))["step"])


def test_step_updates_both_networks_and_counts_images():
    tr = make_trainer("loss.n_critic=2")
    g0, d0 = params(tr.G_module), params(tr.D_module)
    tr.train_step(*tr.draw())
    assert tr.cur_nimg == 2 * tr.cfg.train.batch and tr.step_idx == 1
    assert all(not torch.equal(g0[k], v) for k, v in params(tr.G_module).items())
    assert all(not torch.equal(d0[k], v) for k, v in params(tr.D_module).items())
    assert adam_steps(tr.opt_D) == 2 and adam_steps(tr.opt_G) == 1


def test_g_phase_freezes_d_and_leaves_its_gradients_alone():
    tr = make_trainer()
    reals, latents, gen = tr.draw()
    phase = {p.name: p for p in tr.phases}
    real, real_c = tr._reals(reals[0])
    tr._run_phase(phase["D_main"], real, real_c, latents[0], None, gen, critic=0, last=True)  # keeps the fakes
    assert all(p.grad is None for p in tr.D_module.parameters())  # D's step cleared its gradients
    d_params = params(tr.D_module)
    seen = []
    hooks = [p.register_hook(lambda g: seen.append(g)) for p in tr.D_module.parameters()]
    tr._run_phase(phase["G_main"], None, None, latents[0], None, gen, critic=0, last=True)  # reuses the fakes
    for h in hooks:
        h.remove()
    assert seen == []  # no gradient flowed into any D parameter
    assert all(p.grad is None for p in tr.D_module.parameters())  # and G's phase gave it none
    assert all(torch.equal(d_params[k], v) for k, v in params(tr.D_module).items())
    assert all(p.requires_grad for p in tr.D_module.parameters())  # unfrozen again for the next D phase


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_reused_fakes_equal_a_second_forward_with_the_same_latents(norm):
    a = make_trainer(f"model.dcgan.norm={norm}", "train.reuse_fake=true")
    b = make_trainer(f"model.dcgan.norm={norm}", "train.reuse_fake=false")
    reals, latents, gen = a.draw()
    a.train_step(reals, latents, gen)
    b.train_step(reals, torch.cat([latents, latents]), gen)  # G step regenerates from the same z
    for k, v in params(a.G_module).items():
        torch.testing.assert_close(v, params(b.G_module)[k], rtol=0, atol=1e-6)
    for k, v in params(a.D_module).items():
        torch.testing.assert_close(v, params(b.D_module)[k], rtol=0, atol=1e-6)


def test_lazy_r1_runs_every_interval_with_rescaled_adam():
    tr = make_trainer("loss.r1_gamma=1", "loss.d_reg_interval=4")
    ratio = 4 / 5
    group = tr.opt_D.param_groups[0]
    assert group["lr"] == pytest.approx(2e-4 * ratio)
    assert group["betas"] == pytest.approx((0.5**ratio, 0.999**ratio))
    assert tr.opt_G.param_groups[0]["lr"] == pytest.approx(2e-4)  # G has no penalty: not rescaled
    for _ in range(8):
        tr.train_step(*tr.draw())
    assert adam_steps(tr.opt_D) == 8 + 2  # main every step, R1 at steps 0 and 4
    stats = tr.stats.reduce(tr.dist)
    assert stats["Loss/D/r1"] > 0


def test_r1_in_the_main_step_when_interval_is_one():
    tr = make_trainer("loss.r1_gamma=1", "loss.d_reg_interval=1")
    assert tr.opt_D.param_groups[0]["lr"] == pytest.approx(2e-4)
    for _ in range(3):
        tr.train_step(*tr.draw())
    assert adam_steps(tr.opt_D) == 3
    assert "Loss/D/r1" in tr.stats.reduce(tr.dist)


def test_wgan_gp_and_path_length_phases_run():
    tr = make_trainer(
        "loss.kind=wgan",
        "loss.gp_weight=10",
        "loss.d_reg_interval=1",
        "loss.n_critic=2",
        "loss.pl_weight=2",
        "loss.g_reg_interval=2",
    )
    for _ in range(4):
        tr.train_step(*tr.draw())
    assert adam_steps(tr.opt_D) == 8
    assert adam_steps(tr.opt_G) == 4 + 2
    stats = tr.stats.reduce(tr.dist)
    assert stats["Loss/D/gp"] > 0 and stats["Loss/G/pl"] >= 0 and stats["G/pl_mean"] > 0
    assert all(torch.isfinite(p).all() for p in tr.G_module.parameters())


def test_bf16_trains_and_stays_close_to_fp32():
    a, b = make_trainer("train.precision=fp32"), make_trainer("train.precision=bf16")
    inputs = a.draw()
    a.train_step(*inputs)
    b.train_step(*inputs)
    ga, gb = params(a.G_module), params(b.G_module)
    diff = max((ga[k] - gb[k]).abs().max().item() for k in ga)
    assert 0 < diff < 1e-3  # bf16 really ran (results differ) and Adam steps are ~lr = 2e-4


def test_fp16_scalers_skip_only_the_overflowing_network():
    tr = make_trainer("train.precision=fp16")
    assert tr.G.scaler.is_enabled() and tr.D.scaler.is_enabled()
    for _ in range(20):  # the scalers start high (2^16) and back off until a step overflows neither network
        tr.train_step(*tr.draw())
        warm = tr.stats.reduce(tr.dist)
        if warm["D/skipped"] == 0 and warm["G/skipped"] == 0:
            break
    assert warm["D/skipped"] == 0 and warm["G/skipped"] == 0
    g_scale = tr.G.scaler.get_scale()
    tr.D.scaler.update(new_scale=3e38)  # D's scaled loss now overflows fp32 -> inf gradients
    g0, d0 = params(tr.G_module), params(tr.D_module)
    tr.train_step(*tr.draw())
    assert all(torch.equal(d0[k], v) for k, v in params(tr.D_module).items())  # D skipped its step
    assert tr.D.scaler.get_scale() == pytest.approx(3e38 * 0.5)  # and backed off
    assert any(not torch.equal(g0[k], v) for k, v in params(tr.G_module).items())  # G stepped
    assert tr.G.scaler.get_scale() == g_scale
    stats = tr.stats.reduce(tr.dist)
    assert stats["D/skipped"] == 1 and stats["G/skipped"] == 0
    assert stats["D/loss_scale"] > 1e38


def test_fp16_r1_penalty_is_amp_correct():
    # The scaled-then-unscaled R1 under fp16 must agree with fp32 (it would be off by the loss scale otherwise).
    a = make_trainer("train.precision=fp32", "loss.r1_gamma=1", "loss.d_reg_interval=1")
    b = make_trainer("train.precision=fp16", "loss.r1_gamma=1", "loss.d_reg_interval=1")
    b.D.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # a scale at which this step does not overflow
    inputs = a.draw()
    a.train_step(*inputs)
    b.train_step(*inputs)
    ra, rb = a.stats.reduce(a.dist)["Loss/D/r1"], b.stats.reduce(b.dist)["Loss/D/r1"]
    assert rb == pytest.approx(ra, rel=0.02)


def test_resume_through_a_checkpoint_continues_exactly(tmp_path):
    # 8 steps straight == 4 steps, checkpoint, a new trainer resumes, 4 steps: bit for bit.
    over = [
        "train.total_kimg=0.128",
        "train.ckpt_every_kimg=0.064",
        "loss.r1_gamma=0.5",
        "loss.d_reg_interval=3",
        "train.precision=bf16",
    ]
    straight = make_trainer(*over, run_dir=tmp_path / "a")
    straight.fit()
    first = make_trainer(*over[:-4], "train.total_kimg=0.064", *over[2:], run_dir=tmp_path / "b")
    first.fit()
    second = make_trainer(*over, run_dir=tmp_path / "b")
    second.load_checkpoint(CheckpointManager(tmp_path / "b").latest())
    assert second.cur_nimg == 64
    second.fit()
    for net in ("G_module", "D_module"):
        for k, v in getattr(straight, net).state_dict().items():
            assert torch.equal(v, getattr(second, net).state_dict()[k]), (net, k)
    for k, v in straight.G_ema.state_dict().items():
        assert torch.equal(v, second.G_ema.state_dict()[k]), k
    assert straight.step_idx == second.step_idx == 8


def test_fit_writes_run_dir_outputs(tmp_path):
    tr = make_trainer(run_dir=tmp_path)
    summary = tr.fit()
    assert summary["kimg"] == pytest.approx(0.128)
    assert (tmp_path / "samples" / "reals.png").is_file()
    assert sorted(p.name for p in (tmp_path / "samples").glob("fakes-*.png")) == [
        "fakes-000000000.png",
        "fakes-000000064.png",
        "fakes-000000128.png",
    ]
    ckpts = CheckpointManager(tmp_path).committed()
    assert [p.name for p in ckpts] == ["ckpt-000000064", "ckpt-000000128"]
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert len(lines) == 4  # log every 0.032 kimg = 2 steps of 16


def test_console_line_shows_skips_and_rollbacks_only_when_there_are_some():
    from distgan.tracking import format_stats

    calm = format_stats({"Loss/D/main": 0.5, "D/skipped": 0.0, "G/skipped": 0.0, "Progress/rollbacks": 0}, 1.0)
    assert "skipped" not in calm and "rollbacks" not in calm and "Loss/D/main 0.5" in calm
    trouble = format_stats({"Loss/D/main": 0.5, "D/skipped": 0.25, "Progress/rollbacks": 1}, 1.0)
    assert "D/skipped 0.25" in trouble and "rollbacks 1" in trouble
