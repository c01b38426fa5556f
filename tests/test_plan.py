"""The group planner: SAEs cut into consecutive forward-pass runs whose state fits the memory budget."""

import subprocess
import sys

import pytest

from featurescope.memory import format_bytes, parse_bytes
from featurescope.site_names import Site
from featurescope.precompute.plan import PlanError, SAESpec, default_memory_budget, describe_plan, plan_groups

MB = 1 << 20


def release(layers=range(26), kinds=("res",), d_sae=16384, d_in=64) -> list[SAESpec]:
    return [SAESpec(f"{layer}-{kind}-16k", Site(layer, kind), d_in, d_sae) for layer in layers for kind in kinds]


def per_feature(n_bytes: int):
    return lambda sae: sae.d_sae * n_bytes


def test_every_group_fits_the_budget_with_the_model_pass():
    saes = release(kinds=("att", "mlp", "res"))  # 78 SAEs
    plan = plan_groups(saes, per_feature(2048), budget_bytes=200 * MB, pass_bytes=30 * MB)
    assert all(g.state_bytes + 30 * MB <= 200 * MB for g in plan.groups)
    assert all(g.state_bytes == sum(s.d_sae * 2048 for s in g.saes) for g in plan.groups)
    assert plan.peak_bytes <= 200 * MB
    assert sorted(n for g in plan.groups for n in g.names) == sorted(s.name for s in saes)


def test_groups_are_consecutive_runs_in_forward_pass_order_whatever_the_input_order():
    saes = release(layers=[10, 2, 0, 1], kinds=("res", "att", "mlp"))
    plan = plan_groups(saes, per_feature(1), budget_bytes=4 * 16384)  # 4 SAEs a group
    order = [n for g in plan.groups for n in g.names]
    assert order == [f"{layer}-{kind}-16k" for layer in (0, 1, 2, 10) for kind in ("att", "mlp", "res")]
    assert [len(g.saes) for g in plan.groups] == [4, 4, 4]
    assert [(g.first_layer, g.last_layer) for g in plan.groups] == [(0, 1), (1, 2), (2, 10)]


@pytest.mark.parametrize("per_group,expected", [(26, 1), (13, 2), (10, 3), (1, 26)])
def test_equal_saes_take_the_fewest_groups(per_group, expected):
    plan = plan_groups(release(), per_feature(1), budget_bytes=per_group * 16384)
    assert len(plan.groups) == expected == -(-26 // per_group)


def test_a_wide_sae_shares_its_pass_only_with_what_still_fits_beside_it():
    # 16k SAEs at layers 0-9 and a 1M-wide one at 5-mlp (before 5-res in the forward pass); room for the
    # 1M one plus one 16k: the fewest consecutive groups are three.
    saes = release(layers=range(10)) + [SAESpec("5-mlp-1m", Site(5, "mlp"), 64, 1 << 20)]
    plan = plan_groups(saes, per_feature(1), budget_bytes=(1 << 20) + 16384)
    assert [g.names for g in plan.groups] == [[f"{layer}-res-16k" for layer in range(5)], ["5-mlp-1m", "5-res-16k"],
                                              [f"{layer}-res-16k" for layer in range(6, 10)]]
    assert [g.last_layer for g in plan.groups] == [4, 5, 9]


def test_an_sae_bigger_than_the_budget_names_itself_its_need_and_the_flag():
    saes = release(layers=[3]) + [SAESpec("20-res-1m", Site(20, "res"), 2304, 1 << 20)]
    with pytest.raises(PlanError) as err:
        plan_groups(saes, per_feature(25_000), budget_bytes=8 << 30, pass_bytes=1 << 30)
    message = str(err.value)
    for part in ("20-res-1m", "1,048,576 features", format_bytes((1 << 20) * 25_000), "8.0 GiB", "--memory-budget 26GB"):
        assert part in message


def test_a_budget_that_does_not_cover_the_model_pass_says_so():
    with pytest.raises(PlanError, match="does not cover one model pass"):
        plan_groups(release(layers=[0]), per_feature(1), budget_bytes=MB, pass_bytes=2 * MB)


def test_weight_bytes_count_every_float32_parameter():
    sae = SAESpec("x", Site(0, "res"), d_in=3, d_sae=5)
    assert sae.weight_bytes == 4 * (3 * 5 + 5 * 3 + 5 + 5 + 3)


def test_describe_plan_lists_each_group_its_sites_stop_layer_and_memory():
    plan = plan_groups(release(layers=range(6)), per_feature(1024), budget_bytes=16384 * 1024 * 3 + 5 * MB,
                       pass_bytes=5 * MB)
    text = describe_plan(plan)
    lines = text.splitlines()
    assert lines[0].startswith("2 model passes for 6 SAEs (98,304 features), memory budget 53.0 MiB")
    assert lines[2].split() == ["1", "3", "49,152", "0-res", "..", "2-res", "layer", "2", "53.0", "MiB"]
    assert lines[3].split() == ["2", "3", "49,152", "3-res", "..", "5-res", "layer", "5", "53.0", "MiB"]
    assert "Decoder layers run per batch: 9 (1.50x one pass for all SAEs)" in lines[4]


def test_default_budget_is_half_of_what_the_cpu_has_available(monkeypatch):
    from featurescope import memory

    monkeypatch.setattr(memory, "system_available_bytes", lambda: 10 << 30)
    assert default_memory_budget("cpu") == 5 << 30
    assert default_memory_budget("cpu", share=0.25) == int(2.5 * (1 << 30))


def test_system_available_memory_is_a_plausible_size():
    from featurescope.memory import system_available_bytes

    available = system_available_bytes()
    assert 64 * MB < available < 1 << 50


@pytest.mark.parametrize("text,expected", [("8GB", 8 << 30), ("8g", 8 << 30), ("1.5 GiB", 3 << 29), ("512MB", 512 * MB),
                                           ("1000", 1000), ("2T", 2 << 40)])
def test_memory_sizes_parse_in_powers_of_1024(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "8 XB", "-1GB", "eight"])
def test_a_memory_size_that_does_not_parse_raises_value_error_naming_it(text):
    with pytest.raises(ValueError, match="is not a memory size"):
        parse_bytes(text)


def test_the_planner_does_not_import_torch():
    code = "import sys; import featurescope.precompute.plan; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
