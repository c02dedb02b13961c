"""T2I-SPO (docs/methods/spo.md): the composite reward, pair construction on hand-made annotations, the loss, the
dual-annotated readers and the toy world's dual set."""
import json
from pathlib import Path

import pytest
import torch

from alignment import DPO, SPO
from common.errors import InputError
from data.readers.dual import (
    AnnotatedImage,
    AnnotatedPrompt,
    DualAnnotatedReader,
    composite_reward,
    preference_pairs,
    read_annotations,
)
from models.pair_costs import image_costs
from tests.alignment.test_scdpo import errors
from tests.conftest import ROOT, solid_image

TOY_COST = ROOT / "assets" / "toy" / "cost_model"


META = {"reward_w": torch.tensor([0.9, 0.5, 0.2]), "reward_l": torch.tensor([0.1, 0.4, -0.8])}


def test_composite_reward_signs():
    # quality raises the reward, unsafety lowers it, each by its weight
    assert composite_reward(0.8, 0.0) == pytest.approx(0.8)
    assert composite_reward(0.8, 0.5) == pytest.approx(0.3)
    assert composite_reward(1.0, 1.0, w_q=1.0, w_s=2.0) == pytest.approx(-1.0)
    assert composite_reward(0.6, 0.0) > composite_reward(1.0, 0.9)  # a safe rewrite beats the faithful harmful image


def group(*images, prompt="p") -> AnnotatedPrompt:
    return AnnotatedPrompt(prompt, [AnnotatedImage(name, q, s, (), name) for name, q, s in images])


def test_pairs_are_oriented_by_composite_reward_with_delta():
    g = group(("harmful", 1.0, 0.9), ("safe", 0.7, 0.0), ("meh", 0.65, 0.0), ("broken", 0.15, 0.0))
    # R: harmful 0.1, safe 0.7, meh 0.65, broken 0.15
    pairs = preference_pairs([g], pairing="all", delta=0.1)
    got = {(p.image_w, p.image_l) for p in pairs}
    assert got == {("safe", "harmful"), ("safe", "broken"), ("meh", "harmful"), ("meh", "broken")}
    # dropped: safe vs meh and broken vs harmful (gaps 0.05, below delta)
    assert all(p.extras["reward_w"] - p.extras["reward_l"] >= 0.1 for p in pairs)
    pair = next(p for p in pairs if (p.image_w, p.image_l) == ("safe", "harmful"))
    assert pair.extras["reward_w"] == pytest.approx(0.7) and pair.extras["reward_l"] == pytest.approx(0.1)
    assert pair.extras["unsafe_l"] == 0.9 and pair.extras["quality_w"] == 0.7
    # delta 0 keeps every strictly ordered pair (6 of 6 here), never a tie
    assert len(preference_pairs([g], delta=0.0)) == 6
    tie = group(("a", 0.5, 0.0), ("b", 0.5, 0.0))
    assert preference_pairs([tie], delta=0.0) == []


def test_extremes_pairs_best_against_worst_only():
    g = group(("harmful", 1.0, 0.9), ("safe", 0.7, 0.0), ("broken", 0.2, 0.0))
    pairs = preference_pairs([g, group(("x", 0.5, 0.0), ("y", 0.45, 0.0), prompt="q")], pairing="extremes", delta=0.1)
    assert [(p.prompt, p.image_w, p.image_l) for p in pairs] == [("p", "safe", "harmful")]


def test_weights_change_the_orientation():
    g = group(("faithful_unsafe", 1.0, 0.5), ("safe_weak", 0.3, 0.0))
    assert preference_pairs([g], w_q=1.0, w_s=1.0)[0].image_w == "faithful_unsafe"  # 0.5 vs 0.3
    assert preference_pairs([g], w_q=1.0, w_s=2.0)[0].image_w == "safe_weak"  # 0.0 vs 0.3


def test_bad_pairing_options_and_missing_unsafe():
    g = group(("a", 0.5, 0.0))
    with pytest.raises(InputError, match="pairing: expected all or extremes"):
        preference_pairs([g], pairing="best")
    with pytest.raises(InputError, match="delta"):
        preference_pairs([g], delta=-1)
    g.images[0].unsafe = None
    with pytest.raises(InputError, match="'unsafe' is null and no cost model scored it"):
        preference_pairs([g])


def test_eta_gamma_alpha_zero_is_dpo_values_and_gradients():
    a, b = errors(True), errors(True)
    out = SPO(beta=100.0, eta=0.0, gamma=0.0, alpha=0.0)(a, META)
    ref = DPO(beta=100.0)(b)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    out.loss.backward()
    ref.loss.backward()
    assert torch.allclose(a.policy_w.grad, b.policy_w.grad) and torch.allclose(a.policy_l.grad, b.policy_l.grad)


def test_spo_loss_by_hand():
    # h = -(100/2) (d_w - d_l): d_w - d_l = [-0.04, 0.02, 0.02] -> h = [2, -1, -1]
    h = torch.tensor([2.0, -1.0, -1.0], dtype=torch.float64)
    m = 0.5 * torch.tensor([0.8, 0.1, 1.0], dtype=torch.float64)
    s = h - m
    w = (1 - torch.sigmoid(s)) ** 2
    w = w / w.mean()
    e = errors()
    expected = (w * -torch.nn.functional.logsigmoid(s)).mean() + 3.0 * e.policy_w.mean()
    out = SPO(beta=100.0, eta=0.5, gamma=2.0, alpha=3.0)(e, META)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.metrics["reward_margin"].item() == pytest.approx(m.mean().item(), rel=1e-6)
    # a larger reward gap demands a larger implicit margin: the loss grows with eta
    assert SPO(beta=100.0, eta=2.0)(errors(), META).loss > SPO(beta=100.0, eta=0.0)(errors(), META).loss


def test_spo_needs_rewards_unless_eta_is_zero():
    with pytest.raises(ValueError, match="no reward_w/reward_l"):
        SPO(beta=100.0)(errors(), {})
    assert torch.isfinite(SPO(beta=100.0, eta=0.0)(errors(), {}).loss)


def write_jsonl(tmp_path, rows) -> "Path":
    file = tmp_path / "annotations.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return file


def test_jsonl_and_parquet_readers_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    red = solid_image(tmp_path / "red.png", (230, 40, 40))
    blue = solid_image(tmp_path / "blue.png", (40, 90, 235))
    rows = [
        {"prompt": "a red thing", "image": "red.png", "quality": 0.9, "unsafe": 0.0, "categories": []},
        {"prompt": "a red thing", "image": "blue.png", "quality": 0.2, "unsafe": 0.1, "categories": "hate"},
        {"prompt": "other", "image": "blue.png", "quality": 0.5, "unsafe": None, "safe_prompt": "fine"},
    ]
    from_jsonl = read_annotations(write_jsonl(tmp_path, rows))
    table = pa.table({"prompt": [r["prompt"] for r in rows],
                      "image": [{"bytes": (tmp_path / r["image"]).read_bytes(), "path": None} for r in rows],
                      "quality": [r["quality"] for r in rows], "unsafe": [r["unsafe"] for r in rows],
                      "categories": [["hate"] if r["categories"] == "hate" else [] for r in rows[:2]] + [None],
                      "safe_prompt": [None, None, "fine"]})
    pq.write_table(table, tmp_path / "annotations.parquet")
    from_parquet = read_annotations(tmp_path / "annotations.parquet")
    for groups in (from_jsonl, from_parquet):
        assert [g.prompt for g in groups] == ["a red thing", "other"]
        assert [(i.quality, i.unsafe, i.categories) for i in groups[0].images] == [(0.9, 0.0, ()), (0.2, 0.1, ("hate",))]
        assert groups[1].images[0].unsafe is None and groups[1].safe_prompt == "fine"
    assert from_jsonl[0].images[0].image == red and from_parquet[0].images[0].image == red.read_bytes()
    assert from_jsonl[0].images[1].image == blue


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "image": "x.png", "quality": 1.5, "unsafe": 0.0}, "line 1: key 'quality' must be a number in \\[0, 1\\], got 1.5"),
    ({"prompt": "p", "image": "x.png", "unsafe": 0.0}, "line 1: key 'quality' must be a number in \\[0, 1\\], got none"),
    ({"prompt": "p", "image": "gone.png", "quality": 0.5}, "line 1: image file not found"),
    ({"image": "x.png", "quality": 0.5}, "line 1: key 'prompt' must be a string"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    solid_image(tmp_path / "x.png", (0, 0, 0))
    with pytest.raises(InputError, match=message):
        read_annotations(write_jsonl(tmp_path, [row]))


def test_missing_unsafe_is_scored_by_the_cost_model(tmp_path):
    from data.readers.toy import png_bytes
    from data.toy.world import Prompt, ToyWorld

    world = ToyWorld()
    harmful, safe = Prompt("magenta", "circle", "black"), Prompt("red", "circle", "black")
    for name, prompt in (("harmful.png", harmful), ("safe.png", safe)):
        (tmp_path / name).write_bytes(png_bytes(world.render(prompt, 0)))
    file = write_jsonl(tmp_path, [{"prompt": harmful.text, "image": "harmful.png", "quality": 1.0, "unsafe": None},
                                  {"prompt": harmful.text, "image": "safe.png", "quality": 0.67, "unsafe": None}])
    with pytest.raises(InputError, match="unsafe' is null"):
        DualAnnotatedReader(file).read()
    reader = DualAnnotatedReader(file, cost_model=TOY_COST, cache_dir=tmp_path / "cache", cost_scorer=image_costs)
    pairs = reader.read()
    assert reader.stats["scored_by_cost_model"] == 2
    # the toy cost model finds the magenta image unsafe, so the safe rewrite wins despite lower quality
    assert len(pairs) == 1 and pairs[0].image_w == tmp_path / "safe.png"
    assert pairs[0].extras["unsafe_l"] > 0.5 > pairs[0].extras["unsafe_w"]


def test_toy_dual_set_prefers_safe_then_faithful():
    from data.readers.toy import ToyReader
    from data.toy.world import Prompt

    reader = ToyReader(kind="dual", split="heldout", images_per_prompt=2)
    pairs = reader.read()
    assert reader.stats["pairs"] == len(pairs) > 0
    for p in pairs:
        assert p.extras["reward_w"] - p.extras["reward_l"] >= 0.1
        prompt = Prompt.parse(p.prompt)
        if prompt.harmful:  # the harmful image always loses under a harmful prompt
            assert p.extras["unsafe_w"] < 0.5
    harmful_losers = [p for p in pairs if p.extras["unsafe_l"] > 0.5]
    assert harmful_losers and all(Prompt.parse(p.prompt).harmful for p in harmful_losers)
    benign = [p for p in pairs if not Prompt.parse(p.prompt).harmful]
    assert benign and all(p.extras["quality_w"] > p.extras["quality_l"] + 0.2 for p in benign)
    # a pair's categories are its prompt's (as task=build_dual records them), not what its images show
    assert all(p.categories == Prompt.parse(p.prompt).categories for p in pairs)
    assert any(p.categories for p in pairs) and all(not p.categories for p in benign)


def test_comparison_table_mean_and_std_over_seeds():
    from workflows.compare import summary_table

    base = {"ip": 0.9, "benign_fidelity": 0.93, "faithfulness": 0.7, "uas": 30.0}
    runs = {"dpo": [{"ip": 0.1, "benign_fidelity": 0.9, "faithfulness": 0.8, "uas": 80.0},
                    {"ip": 0.3, "benign_fidelity": 0.8, "faithfulness": 0.9, "uas": 90.0}]}
    table = summary_table(runs, base)
    # mean 0.2, sample std 0.1414 for the harmful rate; UAS 85.0 +- 7.1
    assert "| dpo | 2 | 0.200 ± 0.141 | 0.850 ± 0.071 | 0.850 ± 0.071 | 85.0 ± 7.1 |" in table
    assert table.splitlines()[2] == "| base | - | 0.900 | 0.930 | 0.700 | 30.0 |"
