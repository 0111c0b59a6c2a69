"""The scaling model of distgan/bench/scale.py (docs/scaling.md), against values computed by hand."""

import pytest

from distgan.bench.scale import (
    H100_IB,
    MAX_EVERY,
    SCALES,
    Fabric,
    agreement_every,
    agreement_limit,
    agreement_s,
    allreduce_s,
    bus_bw,
    ddp_buckets,
    ddp_step_s,
    efficiencies,
    exposed_s,
    fit_latency_bandwidth,
    gloo_fabric,
    gpu_step_s,
    half_ring_s,
    num_nodes,
    ring_allreduce_s,
    scaled_step,
    stop_exposed_s,
    strong_scaling,
    tree_allreduce_s,
    zero_step_s,
)

# 4 GPUs per node, 10 us per collective, 1 us per step inside a node, 5 us between nodes, 100 GB/s inside a
# node, 10 GB/s per network adapter.
F = Fabric("test", gpus_per_node=4, base_s=10e-6, intra_step_s=1e-6, inter_step_s=5e-6, intra_bw=100e9, nic_bw=10e9)
US = 1e-6


def test_nodes_and_bus_bandwidth():
    assert [num_nodes(n, F) for n in (1, 4, 5, 8)] == [1, 1, 2, 2]
    assert bus_bw(4, F) == 100e9  # one node: the switch
    assert bus_bw(8, F) == 40e9  # across nodes: 4 adapters of 10 GB/s carry the node's traffic


def test_ring_and_tree_inside_one_node():
    # ring: 10 + 2*3 steps * 1 + 2*3/4 * 1 MB / 100 GB/s = 10 + 6 + 15 us
    assert ring_allreduce_s(1e6, 4, F) == pytest.approx(31 * US)
    # tree: 10 + 2*(3*1 + 0 levels) + 2 * 1 MB / 100 GB/s = 10 + 6 + 20 us
    assert tree_allreduce_s(1e6, 4, F) == pytest.approx(36 * US)
    assert allreduce_s(1e6, 4, F) == pytest.approx(31 * US)  # the cheaper one
    assert allreduce_s(1e6, 1, F) == 0.0  # one rank talks to nobody


def test_ring_and_tree_across_nodes():
    # 8 GPUs on 2 nodes, 1 MB. ring: 10 + 2*(8-2)*1 + 2*(2-1)*5 + 2*7/8 * 1e6/40e9 = 10 + 12 + 10 + 43.75 us
    assert ring_allreduce_s(1e6, 8, F) == pytest.approx(75.75 * US)
    # tree: 10 + 2*(3*1 + 1*5) + 2e6/40e9 = 10 + 16 + 50 us
    assert tree_allreduce_s(1e6, 8, F) == pytest.approx(76 * US)
    # 64 GPUs on 16 nodes, 1 KB: latency decides. ring: 10 + 2*48*1 + 2*15*5 + ~0.05 us; tree: 10 + 2*(3 + 4*5)
    assert ring_allreduce_s(1e3, 64, F) == pytest.approx((10 + 96 + 150 + 2 * 63 / 64 * 1e3 / 40e9 / US) * US)
    assert tree_allreduce_s(1e3, 64, F) == pytest.approx((10 + 46 + 0.05) * US)
    assert allreduce_s(1e3, 64, F) == tree_allreduce_s(1e3, 64, F)


def test_reduce_scatter_is_half_a_ring_with_its_own_fixed_cost():
    assert half_ring_s(1e6, 4, F) == pytest.approx((10 + (31 - 10) / 2) * US)
    assert half_ring_s(1e6, 1, F) == 0.0


def test_ddp_buckets_close_once_they_reach_their_cap():
    first, cap = 1 << 20, 25 << 20
    # 0.6 MB + 0.6 MB reach the 1 MiB first cap; 0.3 MB + 30 MB reach 25 MiB; 10 bytes are left over.
    assert ddp_buckets([600_000, 600_000, 300_000, 30_000_000, 10], first, cap) == [1_200_000, 30_300_000, 10]
    assert ddp_buckets([500_000], first, cap) == [500_000]  # a small network is one bucket: nothing overlaps
    assert ddp_buckets([]) == []


def test_exposed_time_is_the_last_bucket_plus_what_backward_cannot_hide():
    assert exposed_s([2.0, 3.0, 1.0], backward_s=4.0) == 1.0 + 1.0  # 5 s of early buckets behind 4 s backward
    assert exposed_s([2.0, 3.0, 1.0], backward_s=10.0) == 1.0  # all hidden but the last
    assert exposed_s([7.0], backward_s=100.0) == 7.0  # one bucket: ready only when backward ends
    assert exposed_s([], backward_s=1.0) == 0.0


def test_step_times_ddp_and_zero():
    assert ddp_step_s(1e-3, [([1_000_000], 5e-4)], 4, F) == pytest.approx(1e-3 + 31 * US)
    two_nets = [([1_000_000], 5e-4), ([1_000_000], 5e-4)]  # D then G: two all-reduces in sequence
    assert ddp_step_s(1e-3, two_nets, 4, F) == pytest.approx(1e-3 + 62 * US)
    # ZeRO: reduce-scatter + all-gather per network, nothing overlapped: 2 * 20.5 us
    assert zero_step_s(1e-3, [1_000_000], 4, F) == pytest.approx(1e-3 + 41 * US)
    # ZeRO-2 with 4 micro-batches: 4 reduce-scatters and one all-gather
    assert zero_step_s(1e-3, [1_000_000], 4, F, reduces=4) == pytest.approx(1e-3 + 5 * 20.5 * US)


def test_gpu_step_is_arithmetic_or_kernel_launches_whichever_is_longer():
    assert gpu_step_s(1e12, 100, tflops=100, op_us=5) == pytest.approx(0.01)  # 1 TFLOP at 100 TFLOP/s
    assert gpu_step_s(1e9, 300, tflops=100, op_us=6) == pytest.approx(300 * 6 * US)  # launch-bound


def test_fit_recovers_latency_and_bandwidth_and_the_gloo_fabric_reproduces_the_line():
    latency, bw = fit_latency_bandwidth([0, 1e6, 2e6, 4e6], [1e-3, 2e-3, 3e-3, 5e-3])
    assert latency == pytest.approx(1e-3) and bw == pytest.approx(1e9)
    gloo = gloo_fabric(latency / 2, bw)  # 2 ranks: a ring of 2 steps, 2(N-1)/N = 1 times the bytes
    for size in (4096, 1e6, 3e6):
        assert allreduce_s(size, 2, gloo) == pytest.approx(latency + size / bw)


def test_efficiency_of_a_toy_network_on_one_h100_node():
    # G 1 MB and D 0.5 MB of fp32 gradients, each one bucket; a 1 ms step, half of it each network's backward.
    prof = {"G_params": [250_000], "D_params": [125_000], "step_flops": 1.0, "bwd_flops": {"D": 0.5, "G": 0.5}}
    eff = efficiencies(prof, 1e-3, H100_IB)
    # 8 GPUs, one node, ring: 10 + 14*1 us + 2*7/8 * S / 360 GB/s: G 28.861 us, D 26.431 us
    g, d = (24 + 1.75 * 1e6 / 360e9 / US) * US, (24 + 1.75 * 0.5e6 / 360e9 / US) * US
    assert eff["ddp"][0][0] == pytest.approx(1e-3 / (1e-3 + g + d), rel=1e-9)
    # ZeRO: the same fp32 bytes, but two ring collectives per network: 2 * (10 + 7 + 7/8 * S/360e9) us each
    zg, zd = (2 * (17 + 0.875 * 1e6 / 360e9 / US)) * US, (2 * (17 + 0.875 * 0.5e6 / 360e9 / US)) * US
    assert eff["zero1/2"][0][0] == pytest.approx(1e-3 / (1e-3 + zg + zd), rel=1e-9)
    for strategy in eff.values():
        values = [p.efficiency for p in strategy]
        assert len(values) == len(SCALES) and values == sorted(values, reverse=True) and values[0] < 1
        assert all(p.stop_s == 0 for p in strategy)  # the stop agreement hides behind 0.25 s of steps up to 512


def test_the_stop_agreement_constants_are_the_watchdogs():
    from distgan import watchdog
    from distgan.bench import scale

    assert scale.AGREE_EVERY_S == watchdog.AGREE_EVERY_S and scale.MAX_EVERY == watchdog.MAX_EVERY


def test_stop_agreement_cost_and_interval():
    # A gloo ring of N ranks: 2(N-1) TCP hops in a row; 50 us each.
    assert agreement_s(8, 50 * US) == pytest.approx(700 * US)
    assert agreement_s(64, 50 * US) == pytest.approx(6.3e-3)
    assert agreement_s(512, 50 * US) == pytest.approx(51.1e-3)
    assert agreement_s(1, 50 * US) == 0.0
    # Steps between two agreements: 0.25 s of steps (2^-9 s each: 128), at least 1, at most MAX_EVERY.
    assert agreement_every(2**-9) == 128
    assert agreement_every(1.0) == 1
    assert agreement_every(1e-6) == MAX_EVERY
    # One agreement takes the whole 0.25 s at 1 + 0.25 / (2 * 50 us) = 2501 ranks.
    assert agreement_limit(50 * US) == pytest.approx(2501)
    assert agreement_limit(100 * US) == pytest.approx(1251)


def test_stop_agreement_shows_only_where_it_outlasts_the_steps_it_overlaps():
    step = 2**-9  # 128 steps between agreements: 0.25 s
    assert stop_exposed_s(512, step, 50 * US) == 0.0  # 51.1 ms inside 0.25 s
    assert stop_exposed_s(2501, step, 50 * US) == 0.0  # exactly 0.25 s
    # 3001 ranks: 0.3 s per agreement, 0.05 s of it after the 128 steps it overlaps, spread over those steps
    assert stop_exposed_s(3001, step, 50 * US) == pytest.approx(0.05 / 128)
    # Slow steps: one agreement every step; 4 ranks at 0.1 s a hop take 0.6 s, a step 0.5 s: 0.1 s shows per step
    assert stop_exposed_s(4, 0.5, 0.1) == pytest.approx(0.1)


TOY = {"G_params": [250_000], "D_params": [125_000], "step_flops": 1.0, "bwd_flops": {"D": 0.5, "G": 0.5}}


def test_a_step_includes_the_exposed_stop_agreement():
    # 4 ranks on F, 0.125 s of compute, G 1 MB (31 us) and D 0.5 MB (10 + 6 + 7.5 = 23.5 us) all-reduced.
    # Hops of 0.1 s: one agreement 0.6 s; every ceil(0.25 / 0.1250545) = 2 steps, 0.6 - 2 * 0.1250545 s shows.
    p = scaled_step(TOY, 0.125, 4, F, "ddp", 1, hop_s=0.1)
    assert p.comm_s == pytest.approx(54.5 * US)
    assert p.stop_s == pytest.approx((0.6 - 2 * (0.125 + 54.5 * US)) / 2)
    assert p.step_s == pytest.approx(0.125 + 54.5 * US + p.stop_s)
    assert p.efficiency == pytest.approx(0.125 / p.step_s)


def test_accumulation_multiplies_compute_not_communication():
    # G: 1.2 MB + 1 MB (two buckets: the first closes at 1 MiB), D: 0.5 MB; G's backward is 1% of the FLOPs.
    prof = {"G_params": [300_000, 250_000], "D_params": [125_000], "step_flops": 1.0,
            "bwd_flops": {"D": 0.5, "G": 0.01}}  # fmt: skip
    # 4 ranks on F, ring: 16 us + 1.5 * S / 100 GB/s -> G 34 + 31 us, D 23.5 us. A 1 ms micro-batch: G's backward
    # is 10 us, so 24 us of G's first bucket show; with 4 micro-batches only the last backward hides it: the same.
    one = scaled_step(prof, 1e-3, 4, F, "ddp", 1, hop_s=0.0)
    four = scaled_step(prof, 1e-3, 4, F, "ddp", 4, hop_s=0.0)
    assert one.comm_s == pytest.approx((31 + 24 + 23.5) * US)
    assert four.comm_s == pytest.approx((31 + 24 + 23.5) * US)  # not 31 + 0 + 23.5: no_sync before the last
    assert four.efficiency == pytest.approx(4e-3 / (4e-3 + 78.5 * US))
    # ZeRO per network: half rings G (2.2 MB) 10 + (49 - 10) / 2 = 29.5 us, D 10 + (23.5 - 10) / 2 = 16.75 us.
    # ZeRO-1 reduces at the accumulation boundary (2 half rings each), ZeRO-2 every micro-batch (4 + 1).
    assert scaled_step(prof, 1e-3, 4, F, "zero1", 4, hop_s=0.0).comm_s == pytest.approx(2 * 46.25 * US)
    assert scaled_step(prof, 1e-3, 4, F, "zero2", 4, hop_s=0.0).comm_s == pytest.approx(5 * 46.25 * US)
    assert scaled_step(prof, 1e-3, 4, F, "zero2", 1, hop_s=0.0).comm_s == pytest.approx(2 * 46.25 * US)


def test_strong_scaling_splits_the_arithmetic_not_the_launches_or_the_bytes():
    # Batch 64 over 8 / 64 / 512 GPUs of F (4 per node). 1 GPU: max(4 ms arithmetic, 1 ms launches) = 4 ms.
    # 8 GPUs, 8 each: max(0.5, 1) = 1 ms; G 1 MB ring 75.75 us, D 0.5 MB tree 10 + 16 + 25 = 51 us (2 nodes).
    # 64 GPUs, 1 each: 1 ms; trees on 16 nodes: G 10 + 46 + 50 = 106 us, D 10 + 46 + 25 = 81 us.
    # 512 GPUs: fewer images than GPUs.
    r8, r64, r512 = strong_scaling(TOY, 64, 4e-3, 1e-3, F)
    assert (r8.per_gpu, r64.per_gpu, r512) == (8, 1, None)
    assert r8.step_s == pytest.approx(1e-3 + 126.75 * US)
    assert r8.speedup == pytest.approx(4e-3 / (1e-3 + 126.75 * US)) and r8.efficiency == pytest.approx(r8.speedup / 8)
    assert r64.step_s == pytest.approx(1e-3 + 187 * US)  # (the agreement, 6.3 ms, hides in 0.25 s of steps)
    assert r64.efficiency == pytest.approx(4e-3 / (1e-3 + 187 * US) / 64)
    # Launch-bound (the shipped configs on a GPU): N GPUs are no faster than one.
    l8 = strong_scaling(TOY, 64, 0.1e-3, 1e-3, F)[0]
    assert l8.speedup == pytest.approx(1e-3 / (1e-3 + 126.75 * US)) and l8.speedup < 1
    # A batch 64 GPUs do not divide
    assert [r is None for r in strong_scaling(TOY, 96, 4e-3, 1e-3, F)] == [False, True, True]


def test_a_gpu_step_ms_is_taken_as_launch_bound():
    import argparse

    from distgan.bench.scale import _gpu_parts, _gpu_step

    prof = {"step_flops": 2e11, "step_ops": 300}
    given = argparse.Namespace(gpu_step_ms=0.5, gpu_tflops=100.0, gpu_op_us=6.0)
    assert _gpu_parts(prof, given) == (0.0, pytest.approx(5e-4))
    counted = argparse.Namespace(gpu_step_ms=None, gpu_tflops=100.0, gpu_op_us=6.0)
    assert _gpu_parts(prof, counted) == (pytest.approx(2e-3), pytest.approx(1.8e-3))
    assert _gpu_step(prof, counted) == pytest.approx(2e-3)


def test_command_line_parses_and_prints_its_help(capsys):
    import argparse

    from distgan.bench.scale import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="what"))
    args = p.parse_args(["scale", "--model-only", "--gpu-step-ms", "0.5"])
    assert args.model_only and args.gpu_step_ms == 0.5 and args.config is None  # None: the shipped configs
    assert args.tcp_hop_us == pytest.approx(50.0)
    assert p.parse_args(["scale", "--tcp-hop-us", "20"]).tcp_hop_us == 20.0
    with pytest.raises(SystemExit):
        p.parse_args(["scale", "--help"])
    assert "off by > 15%" in capsys.readouterr().out  # argparse formats help with %: a bare one breaks --help
