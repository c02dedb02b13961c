"""The toy world: grammar, split, rewrites, determinism, and the oracles' accuracy on rendered images."""
import numpy as np
import pytest

from data.readers.toy import ToyReader
from data.toy import oracle as toy_oracle
from data.toy.world import CATEGORIES, HARMFUL, KINDS, Prompt, ToyWorld, all_prompts


@pytest.fixture(scope="module")
def rendered():
    world = ToyWorld()
    prompts = [p for p in all_prompts() for _ in range(4)]
    images = [world.render(p, seed) for p, seed in zip(prompts, list(range(4)) * len(all_prompts()))]
    return prompts, images


def test_every_category_has_two_harmful_attributes_and_rewrites_swap_one():
    for category in CATEGORIES:
        assert sum(1 for c, _, _ in HARMFUL.values() if c == category) >= 2
    for prompt in all_prompts():
        if prompt.harmful:
            safe = prompt.safe_rewrite()
            assert not safe.harmful
            changed = [k for k in KINDS if prompt.attributes()[k] != safe.attributes()[k]]
            assert len(changed) == 1


def test_split_is_deterministic_and_heldout_combinations_are_unseen():
    a, b = ToyWorld(seed=0).split, ToyWorld(seed=0).split
    assert a == b and ToyWorld(seed=1).split != a
    train = set(a["train_benign"] + a["train_harmful"])
    heldout = set(a["heldout_benign"] + a["heldout_harmful"])
    assert not train & heldout and heldout
    assert {v for p in a["heldout_harmful"] for v in p.harmful} == set(HARMFUL)  # every harmful attribute evaluated


def test_rendering_is_deterministic_per_seed():
    world, prompt = ToyWorld(), Prompt("red", "star", "gray")
    assert np.array_equal(np.asarray(world.render(prompt, 3)), np.asarray(world.render(prompt, 3)))
    assert not np.array_equal(np.asarray(world.render(prompt, 3)), np.asarray(world.render(prompt, 4)))


def test_oracle_reads_every_attribute(rendered):
    prompts, images = rendered
    reading = toy_oracle.read(images)
    for kind in KINDS:
        accuracy = np.mean([a == p.attributes()[kind] for a, p in zip(reading.argmax(kind), prompts)])
        assert accuracy >= 0.98, kind


def test_harm_oracle_accuracy_and_category(rendered):
    prompts, images = rendered
    per_category = toy_oracle.harm_by_category(images)
    p = toy_oracle.harm_probability(images)
    assert np.mean((p >= 0.5) == np.array([bool(q.harmful) for q in prompts])) >= 0.98
    for category in CATEGORIES:
        truth = np.array([category in q.categories for q in prompts])
        assert np.mean((per_category[category] >= 0.5) == truth) >= 0.98, category


def test_fidelity_oracle_separates_matching_from_rewritten_prompts(rendered):
    prompts, images = rendered
    q_own = toy_oracle.fidelity([p.text for p in prompts], images)
    assert np.all((q_own >= 0.0) & (q_own <= 1.0))
    assert np.mean(q_own >= 0.8) >= 0.98
    harmful = [i for i, p in enumerate(prompts) if p.harmful]
    q_rewrite = toy_oracle.fidelity([prompts[i].safe_rewrite().text for i in harmful], [images[i] for i in harmful])
    # a harmful image shows two of its rewrite's three attributes
    assert np.all(q_rewrite < 0.75) and np.all(q_rewrite > 0.55)


def test_toy_pairs_are_shaped_like_coprov2_pairs():
    pairs = ToyReader(images_per_prompt=2).read()
    world = ToyWorld()
    assert len(pairs) == 2 * len(world.split["train_harmful"])
    first = pairs[0]
    prompt = Prompt.parse(first.prompt)
    assert prompt.harmful and first.safe_prompt == prompt.safe_rewrite().text
    assert first.categories == prompt.categories
    # winner is safe and shows the rewrite; loser shows the harmful prompt
    from data.pairs import load_rgb

    images = [load_rgb(first.image_w, "w"), load_rgb(first.image_l, "l")]
    assert toy_oracle.harm_probability(images).round().tolist() == [0.0, 1.0]
    assert toy_oracle.fidelity([first.safe_prompt, first.prompt], images).min() > 0.9
    captions = ToyReader(kind="images", images_per_prompt=1).read()
    assert all(p.image_l is None for p in captions)
    assert len(captions) == len(world.split["train_benign"]) + len(world.split["train_harmful"])


def test_bad_prompt_is_named():
    with pytest.raises(ValueError, match="not a toy-world prompt: 'a purple circle on black'"):
        Prompt.parse("a purple circle on black")
