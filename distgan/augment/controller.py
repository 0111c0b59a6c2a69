"""The augmentation of a run: which pipe D's inputs go through, and how ADA's probability p moves.

    augment.kind=none      no pipe
    augment.kind=diffaug   DiffAugment on every image D sees (augment.policy); no p
    augment.kind=ada       each op of augment.ops with probability p x its multiplier; p is
                             adaptive  (augment.ada_target > 0, the default 0.6): ADA's controller below
                             fixed     (ada_target=0): augment.p throughout
                             ramped    (ada_target=0 and schedule.augment_p): a function of kimg, R3GAN's way

ADA's controller (Karras et al. 2020, sec. 3): D's overfitting shows in its real logits. Every D_main forward adds
sign(D(real)) of its reals to a running sum (on the device: no host sync); every augment.ada_interval steps the sums
of all ranks are added up (one all-reduce of two numbers), r_t = E[sign(D(real))], and

    p <- clamp(p + sign(r_t - target) * N / (ada_kimg * 1000), 0, 1)      N = real images shown since the last move

so p can cross [0, 1] within ada_kimg thousand images. Every rank adds the same sums to the same p with the same
ops: p is identical on every rank by construction, with nothing to broadcast.

What a checkpoint keeps: p (the same on every rank: state.pt) and each rank's partial sums since the last move (its
rank file), so a run stopped between two moves resumes with the move it was about to make. The pipe's random
numbers come from the step's generator, itself a function of (seed, rank, images seen), so they need no state.
"""

from __future__ import annotations

import torch

from distgan.augment import build_pipe


class Augmentation:
    version = 1  # of state_dict()

    def __init__(self, cfg, dist, stats):
        a = cfg.augment
        self.cfg, self.dist, self.stats = a, dist, stats
        self.kind = a.kind
        self.pipe = None
        if a.kind != "none":
            self.pipe = build_pipe(a.kind, a.policy, a.ops).to(dist.device)
            if hasattr(self.pipe, "p"):
                self.pipe.p.fill_(a.p)
        self.adaptive = a.kind == "ada" and a.ada_target > 0
        self.signs = torch.zeros([2], device=dist.device)  # [sum of sign(D(real)), count] since the last move
        self.step_nimg = cfg.train.batch * cfg.loss.n_critic  # real images per step, over all ranks

    @property
    def p(self) -> torch.Tensor | None:
        return getattr(self.pipe, "p", None)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x if self.pipe is None else self.pipe(x, gen)

    def observe(self, real_logits: torch.Tensor) -> None:
        """D_main's logits of its reals (D's phase only: what D says about the reals it is trained on)."""
        if self.adaptive:
            logits = real_logits.detach().float()
            self.signs += torch.stack([logits.sign().sum(), torch.tensor(float(logits.numel()), device=logits.device)])

    def after_step(self, step_idx: int) -> None:
        """After step `step_idx` (counted from 1): move p when due; report p (and r_t when it moved)."""
        if self.adaptive and step_idx % self.cfg.ada_interval == 0:
            total = self.dist.all_reduce_sum(self.signs.clone())  # [2], the same on every rank
            rt = total[0] / total[1].clamp(min=1)
            move = torch.sign(rt - self.cfg.ada_target) * (self.step_nimg * self.cfg.ada_interval)
            self.p.copy_((self.p + move / (self.cfg.ada_kimg * 1000)).clamp(0, 1))
            self.signs.zero_()
            self.stats.report("Augment/rt", rt)
        if self.p is not None:
            self.stats.report("Augment/p", self.p)

    def set_p(self, value: float) -> None:
        """p from schedule.augment_p (ada_target=0)."""
        if self.p is not None and not self.adaptive:
            self.p.fill_(value)

    # the checkpoint's parts: p (shared) and this rank's sums (rank)
    def state_dict(self) -> dict:
        return {"kind": self.kind, "p": None if self.p is None else self.p.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        # A run may switch augmentation on at a resume (or change its kind): p then starts from augment.p.
        if self.p is not None and state.get("kind") == "ada" and self.kind == "ada" and state.get("p") is not None:
            self.p.copy_(state["p"])

    def rank_part(self):
        return _Sums(self)


class _Sums:
    version = 1

    def __init__(self, aug: Augmentation):
        self.aug = aug

    def state_dict(self) -> dict:
        return {"signs": self.aug.signs.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.aug.signs.copy_(state["signs"])
