"""HardwareProfile: latency + bandwidth fits, look-ups, JSON and its errors."""

import dataclasses
import json

import pytest

from galvatron_fx.cost.hardware import CommFit, HardwareProfile, fit_latency_bandwidth, mean_profile
from galvatron_fx.errors import ProfileError


def test_fit_recovers_latency_and_bandwidth():
    sizes = [2**k for k in range(10, 24, 3)]
    fit = fit_latency_bandwidth(sizes, [30e-6 + s / 5e9 for s in sizes])
    assert fit.latency_s == pytest.approx(30e-6, rel=1e-6)
    assert fit.bandwidth_Bps == pytest.approx(5e9, rel=1e-6)
    noisy = fit_latency_bandwidth([1, 2, 3], [3.0, 2.0, 1.0])  # decreasing: no negative bandwidth
    assert noisy.latency_s == 0 and noisy.bandwidth_Bps > 0


def _profile() -> HardwareProfile:
    return HardwareProfile(
        world_size=8,
        devices_per_node=8,
        device="H100-80GB",
        memory_bytes=80 * 2**30,
        collectives={"all_reduce/2/consecutive": CommFit(1e-5, 1e10), "all_to_all/4/strided": CommFit(2e-5, 4e9)},
        p2p={2: CommFit(0.0, 2e10)},
        overlap_slowdown=1.2,
        flops_per_s={"bf16": 4e14},
    )


def test_lookups_rescale_missing_group_sizes():
    profile = _profile()
    assert profile.collective_s("all_reduce", 1e6, 2) == pytest.approx(1e-5 + 1e6 / 1e10)
    assert profile.collective_s("all_reduce", 1e6, 1) == 0.0
    # group 4 is not measured: same link, ring volume 2·3/4 instead of 2·1/2 → 1.5x the bytes term
    assert profile.collective_s("all_reduce", 1e6, 4) == pytest.approx(1e-5 + 1.5 * 1e6 / 1e10)
    # all-gather falls back to half an all-reduce
    assert profile.collective_s("all_gather", 1e6, 2) == pytest.approx(0.5e-5 + 1e6 / 2e10)
    # the strided fit serves the consecutive layout when only it was measured
    assert profile.collective_s("all_to_all", 4e6, 4, True) == pytest.approx(2e-5 + 1e-3)
    assert profile.p2p_s(2e6, 2) == pytest.approx(1e-4) and profile.p2p_s(2e6, 4) == pytest.approx(1e-4)
    with pytest.raises(ProfileError, match="flops_per_s/fp32"):
        profile.sustained_flops("fp32")


def test_json_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "hw.json"
    _profile().save(path)
    loaded = HardwareProfile.load(path, world_size=8, device="H100-80GB")
    assert loaded.collectives == _profile().collectives and loaded.p2p == _profile().p2p
    assert loaded.overlap_slowdown == 1.2 and loaded.source == str(path)
    timed = dataclasses.replace(_profile(), op_overhead_s=8e-6, autocast_cast_s_per_param=3e-9)
    timed.save(path)
    loaded = HardwareProfile.load(path)
    assert (loaded.op_overhead_s, loaded.autocast_cast_s_per_param) == (8e-6, 3e-9)
    assert mean_profile([timed, dataclasses.replace(timed, op_overhead_s=4e-6)]).op_overhead_s == 6e-6

    with pytest.raises(ProfileError) as error:
        HardwareProfile.load(path, world_size=16)
    assert str(path) in str(error.value) and "world_size" in str(error.value)
    with pytest.raises(ProfileError) as error:
        HardwareProfile.load(path, device="A100-40GB")
    assert str(path) in str(error.value) and "device" in str(error.value)
    with pytest.raises(ProfileError, match="does not exist"):
        HardwareProfile.load(tmp_path / "absent.json")
    path.write_text('{"format": "galvatron_fx.hardware_profile/1", "world_size": ')
    with pytest.raises(ProfileError, match="not valid JSON"):
        HardwareProfile.load(path)
    data = _profile().to_json_dict()
    data["collectives"]["all_reduce/2/consecutive"] = [1e-5, -3.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as error:
        HardwareProfile.load(path)
    assert str(path) in str(error.value) and "key collectives" in str(error.value)
    del data["collectives"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="key collectives is missing"):
        HardwareProfile.load(path)


def test_mean_of_passes_averages_every_figure_and_each_fit_pointwise():
    slow = dataclasses.replace(
        _profile(),
        collectives={"all_reduce/2/consecutive": CommFit(2e-3, 1e9)},
        p2p={2: CommFit(1e-4, 2e9)},
        optimizer_s_per_param=3e-9,
        compute_slowdown=2.0,
        blocking_by_group_s={2: 1e-3},
        source="a",
    )
    fast = dataclasses.replace(
        slow,
        collectives={"all_reduce/2/consecutive": CommFit(1e-3, 4e9)},
        p2p={2: CommFit(3e-4, 2e9)},
        optimizer_s_per_param=1e-9,
        compute_slowdown=1.0,
        blocking_by_group_s={2: 3e-3},
        source="b",
    )
    mean = mean_profile([slow, fast])
    for nbytes in (1e3, 1e6, 1e8):  # a fit's time at every size is the mean of the passes'
        expected = (slow.collective_s("all_reduce", nbytes, 2) + fast.collective_s("all_reduce", nbytes, 2)) / 2
        assert mean.collective_s("all_reduce", nbytes, 2) == pytest.approx(expected)
        assert mean.p2p[2].time_s(nbytes) == pytest.approx(
            (slow.p2p[2].time_s(nbytes) + fast.p2p[2].time_s(nbytes)) / 2
        )
    assert (mean.optimizer_s_per_param, mean.compute_slowdown) == pytest.approx((2e-9, 1.5))
    assert mean.blocking_by_group_s[2] == pytest.approx(2e-3) and mean.source.startswith("mean of 2 passes")
    with pytest.raises(ProfileError, match="not a pass over the cluster"):
        mean_profile([slow, dataclasses.replace(fast, world_size=4)])
    with pytest.raises(ProfileError, match="not a pass over the cluster"):
        mean_profile([slow, dataclasses.replace(fast, p2p={})])


def test_the_skew_is_what_an_all_reduce_between_compute_costs_beyond_its_swept_time():
    """The sweep times a collective every rank starts together; between compute the ranks arrive apart. The skew
    is the difference, so that the sweep's fit plus the skew prices a collective between compute whatever
    share of it a launch's fit put in its latency."""
    from galvatron_fx.cost.compute_probes import TOKEN_BYTES
    from galvatron_fx.cost.hardware_profiler import skew_beyond_sweep

    fits = {"all_reduce/2/consecutive": CommFit(1e-3, 1e9), "all_reduce/4/consecutive": CommFit(0.0, 1e9)}
    skew = skew_beyond_sweep({2: 3e-3, 4: 5e-3}, fits)
    assert skew[2] == pytest.approx(3e-3 - 1e-3 - TOKEN_BYTES / 1e9)
    assert skew[4] == pytest.approx(5e-3 - TOKEN_BYTES / 1e9)
    assert skew_beyond_sweep({2: 0.5e-3}, fits) == {2: 0.0}  # faster than the sweep: no skew, never negative
