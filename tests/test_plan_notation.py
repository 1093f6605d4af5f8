"""The one plan notation (plan.format_plan / parse_plan) and plan files: every field of every
plan kind survives a round trip, and bad text is refused with the grammar."""
from __future__ import annotations

import pytest

from masep.plan import (EpPlan, SeparatedPlan, SinglePlan, TpPpPlan, format_plan, load_plan, parse_placement,
                        parse_plan, plan_file_text, read_plan_file)

PLANS = [
    SinglePlan(), SinglePlan(3),
    SeparatedPlan(2, 4, 8, 2), SeparatedPlan(1, 3, 2, 1, seq_split=True),
    SeparatedPlan(2, 1, 3, 4, placement=((0, 1, 2, 3), (4, 5, 6, 7), (0, 2, 5)), seq_split=True),
    TpPpPlan(2, 2, 2), TpPpPlan(8, 2, 1),
    EpPlan(4, 2), EpPlan(3, 1, placement=((0, 1), (2,), (3, 4, 5, 6, 7, 0))),
]


@pytest.mark.parametrize("plan", PLANS, ids=format_plan)
def test_round_trip(plan):
    assert parse_plan(format_plan(plan)) == plan


@pytest.mark.parametrize("text,plan", [
    ("sep 2x4+8 m2", SeparatedPlan(2, 4, 8, 2)),
    ("SEP 2 x 4 + 8   M1", SeparatedPlan(2, 4, 8, 1)),
    ("sep 1x3+1", SeparatedPlan(1, 3, 1, 2)),  # run's default m: 2
    ("tp2xpp2", TpPpPlan(2, 2, 2)),  # tp_pp's default m: the stages
    ("tp8pp2 m1", TpPpPlan(8, 2, 1)),
    ("ep4", EpPlan(4, 2)),
    ("ep2 m1 placement=0-7;0,1,2,3", EpPlan(2, 1, placement=(tuple(range(8)), (0, 1, 2, 3)))),
    ("single", SinglePlan()),
])
def test_accepted_spellings(text, plan):
    assert parse_plan(text) == plan


def test_printed_form():
    assert format_plan(SeparatedPlan(2, 1, 2, 3, placement=((0, 1, 2, 3, 5), (4, 6, 7)), seq_split=True)) == \
        "sep 2x1+2 m3 seq-split placement=0-3,5;4,6,7"
    assert [format_plan(p) for p in (TpPpPlan(8, 2, 2), EpPlan(16, 1), SinglePlan())] == ["tp8pp2 m2", "ep16 m1",
                                                                                           "single"]


@pytest.mark.parametrize("text,message", [
    ("sep twelve", "does not start with a plan shape"),
    ("separated 12+4", "does not start with a plan shape"),
    ("ma-12a4e", "does not start with a plan shape"),
    ("tp2pp2 m2 seq-split", "'seq-split' is given twice or is not an option of tpTppP plans"),
    ("single placement=0-7", "not an option of single plans"),
    ("ep4 m2 m3", "'m3' is given twice"),
    ("sep 1x2+2 m2 placement=0,x", "expected comma-separated expert ids"),
])
def test_bad_notation_names_the_text_and_the_grammar(text, message):
    with pytest.raises(ValueError) as err:
        parse_plan(text)
    assert message in str(err.value) and repr(text) in str(err.value)


def test_placement_flag_takes_ranges():
    assert parse_placement("0-3;4,5,6-7") == ((0, 1, 2, 3), (4, 5, 6, 7))
    with pytest.raises(ValueError, match="--placement='0;a'"):
        parse_placement("0;a")


def test_plan_file_round_trip(tmp_path):
    plan = SeparatedPlan(2, 2, 3, 2, placement=((0, 1, 2), (3, 4, 5), (6, 7, 0)))
    path = tmp_path / "plan.toml"
    path.write_text(plan_file_text(plan, dict(preset="tiny", gpus=7, hardware="h100", batch=4, context=64),
                                   dict(tpot_ms=1.5), ["winner: it", "  because"], [dict(plan="ep7 m1", tpot_ms=2.0)]))
    back, doc = read_plan_file(str(path))
    assert back == plan and doc["planned_for"]["preset"] == "tiny" and doc["reasons"] == ["winner: it", "  because"]
    assert load_plan(str(path))[0] == plan and load_plan("ep2 m1") == (EpPlan(2, 1), None)
    (tmp_path / "bad.toml").write_text('plan = "sep 1x1+1 m2"\nstrategy = "ep"\n')
    with pytest.raises(ValueError, match="disagrees"):
        read_plan_file(str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match="neither a plan file nor a plan"):
        load_plan("nonsense")
    with pytest.raises(ValueError, match="no such file"):
        load_plan(str(tmp_path / "missing.toml"))
