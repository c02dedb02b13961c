"""The latent cache: built once, hit on the second run without calling the VAE, keyed by resolution."""
import pytest
import torch
from PIL import Image

from common.errors import InputError
from data.datamodule import PreferenceDataModule
from data.pairs import load_rgb, preprocess
from data.readers import JsonlReader
from models.encoders import ConditionEncoder


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts encode calls."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.calls = vae, 0
        self.config = vae.config

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


def datamodule(components, jsonl, cache_dir, resolution=16, **kw):
    encoder = ConditionEncoder(components)
    encoder.vae = CountingVAE(components.vae)
    dm = PreferenceDataModule(JsonlReader(jsonl), encoder=encoder, resolution=resolution, batch_size=4,
                              num_workers=0, cache_dir=cache_dir, cache_dtype="float32", **kw)
    return dm, encoder.vae


def test_second_run_hits_cache_and_resolution_change_misses(tiny_components, jsonl_pairs, tmp_path):
    dm1, vae1 = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    dm1.prepare_data()
    dm1.setup("fit")
    assert vae1.calls > 0
    first = next(iter(dm1.train_dataloader()))

    dm2, vae2 = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    dm2.prepare_data()
    dm2.setup("fit")
    assert vae2.calls == 0  # cache hit: the VAE is not called
    assert dm2.cache_path() == dm1.cache_path()
    assert len(dm2.train_set) == 8

    dm3, vae3 = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", resolution=8)
    dm3.prepare_data()
    assert vae3.calls > 0 and dm3.cache_path() != dm1.cache_path()
    assert first["latents_w"].shape == (4, 4, 8, 8)  # the tiny VAE downsamples by 2


def test_cached_latents_and_embeddings_are_the_encoders_outputs(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    dm.setup("fit")
    item = dm.train_set[dm.train_set.indices.index(2)]
    pair = dm.pairs[2]
    encoder = ConditionEncoder(tiny_components)
    pixels = preprocess(load_rgb(pair.image_l, "test"), 16)[None]
    assert torch.allclose(item["latents_l"], encoder.encode_images(pixels)[0], atol=1e-5)
    assert torch.allclose(item["prompt_embeds"], encoder.encode_prompts([pair.prompt])[0], atol=1e-5)
    assert item["meta"]["categories"] == pair.categories


def test_changed_image_invalidates_the_cache(tiny_components, jsonl_pairs, tmp_path):
    dm1, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    before = dm1.cache_path()
    Image.new("RGB", (30, 30), (1, 2, 3)).save(jsonl_pairs.parent / "img" / "w0.png")
    dm2, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    assert dm2.cache_path() != before


def test_random_flip_caches_mirrored_latents(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", random_flip=True)
    dm.setup("fit")
    assert {"latents_w_flip", "latents_l_flip"} <= dm.train_set.cache.keys


def test_category_filter_and_validation_split(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", categories=["Violence"], val_fraction=0.25)
    dm.setup("fit")
    chosen = dm.train_set.indices + dm.val_set.indices
    assert sorted(chosen) == [1, 3, 5, 7] and len(dm.val_set) == 1
    batch = next(iter(dm.train_dataloader()))
    assert all(c == ("violence",) for c in batch["meta"]["categories"])


def test_keep_uncategorized_adds_the_pairs_without_categories(tiny_components, jsonl_pairs, tmp_path):
    from tests.workflows.test_hostile_inputs import rewrite_jsonl

    # two of the hate pairs become clean pairs (no category)
    rewrite_jsonl(jsonl_pairs, lambda lines: [lines[i].update(categories=[]) for i in (0, 4)])
    for keep, expected in ((False, [1, 3, 5, 7]), (True, [0, 1, 3, 4, 5, 7])):
        dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / f"cache{keep}", categories=["violence"],
                           keep_uncategorized=keep)
        dm.setup("fit")
        assert sorted(dm.train_set.indices) == expected


def test_anchor_others_serves_each_pair_with_a_pair_from_outside_the_filter(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", categories=["violence"], anchor_others=True)
    dm.setup("fit")
    assert sorted(dm.train_set.indices) == [1, 3, 5, 7] and sorted(dm.train_set.anchor_indices) == [0, 2, 4, 6]
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents_w"].shape[0] == 8 and batch["meta"]["anchor"].tolist() == [False] * 4 + [True] * 4
    assert batch["meta"]["categories"] == [("violence",)] * 4 + [("hate",)] * 4
    assert all(i % 2 == 0 for i in batch["meta"]["index"][4:].tolist())
    # without a filter no pair is left out: nothing to anchor (the recipe's single-LoRA and all-single runs)
    unfiltered, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", anchor_others=True)
    unfiltered.setup("fit")
    assert len(unfiltered.train_set.indices) == 8 and unfiltered.train_set.anchor_indices == []
    assert "anchor" not in next(iter(unfiltered.train_dataloader()))["meta"]


def test_unknown_category_lists_the_known_ones(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", categories=["nudity_typo"])
    with pytest.raises(InputError, match=r"unknown category \['nudity_typo'\]; the data has \['hate', 'violence'\]"):
        dm.setup("fit")


def test_p_uncond_one_always_trains_on_the_empty_prompt(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", p_uncond=1.0)
    dm.setup("fit")
    empty = ConditionEncoder(tiny_components).encode_prompts([""])[0]
    assert torch.allclose(dm.train_set[0]["prompt_embeds"], empty, atol=1e-5)


def test_condition_on_both_trains_each_pair_under_its_prompt_and_its_safe_rewrite(tiny_components, jsonl_pairs, tmp_path):
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", condition_on="both")
    dm.setup("fit")
    assert len(dm.train_set) == 16
    encoder = ConditionEncoder(tiny_components)
    own, rewrite = dm.train_set[3], dm.train_set[3 + 8]
    # the same images encoded in different batches: equal up to float32 rounding
    torch.testing.assert_close(own["latents_w"], rewrite["latents_w"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own["latents_l"], rewrite["latents_l"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(own["prompt_embeds"], encoder.encode_prompts(["a red circle 3"])[0], atol=1e-5)
    assert torch.allclose(rewrite["prompt_embeds"], encoder.encode_prompts(["a green circle"])[0], atol=1e-5)
    safe, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", condition_on="safe")
    assert [p.prompt for p in safe.pairs] == ["a green circle"] * 8


def test_condition_on_safe_needs_safe_rewrites(tiny_components, jsonl_pairs, tmp_path):
    import json

    lines = [json.loads(line) for line in jsonl_pairs.read_text().splitlines()]
    del lines[2]["safe_prompt"]
    jsonl_pairs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", condition_on="safe")
    with pytest.raises(InputError, match=r"condition_on=safe: .*pairs.jsonl line 3 has no safe_prompt"):
        dm.setup("fit")
    with pytest.raises(InputError, match="data.condition_on: expected one of unsafe, safe, both, got 'harmful'"):
        datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", condition_on="harmful")


def test_condition_on_both_splits_train_and_val_by_source_pair(tiny_components, jsonl_pairs, tmp_path):
    """Both prompts of a pair share its images: they land on the same side of the split."""
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", condition_on="both", val_fraction=0.25)
    dm.setup("fit")
    n = len(dm.pairs) // 2
    val, train = set(dm.val_set.indices), set(dm.train_set.indices)
    assert len(val) == 4 and len(train) == 12  # 2 of the 8 source pairs, each under both prompts
    assert {i % n for i in val}.isdisjoint({i % n for i in train})
    plain, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", val_fraction=0.25)
    plain.setup("fit")
    assert {i % n for i in val} == set(plain.val_set.indices)  # the same source pairs as without rewrites


def test_changed_tokenizer_files_change_the_cache_key(tiny_components, jsonl_pairs, tmp_path):
    """Same encoder weights, another tokenizer vocabulary: the prompt embeddings must be recomputed."""
    import json

    from transformers import CLIPTokenizer

    dm1, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    first = dm1.cache_path()
    tokenizer_dir = tmp_path / "tok"
    tiny_components.tokenizer.save_pretrained(tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(k for k in vocab if k.endswith("</w>"))[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two words swap ids: their embeddings change, the weights do not
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(spec))
    tiny_components.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    dm2, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    assert dm2.cache_path() != first
    tiny_components.tokenizer.model_max_length = 20
    dm3, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    assert dm3.cache_path() not in (first, dm2.cache_path())
