"""A reader takes the same config keys wherever it is used: alone (data=coprov2, data=pickapic) or
mixed (data=scp's harmful and clean readers)."""
from pathlib import Path

import pytest
from conftest import solid_image
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

import workflows.cli  # noqa: F401 - registers the config schema and the ${repo:...} resolver

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def reader_of(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides)).data.reader


@pytest.mark.parametrize("alone, mixed", [("coprov2", "harmful"), ("pickapic", "clean")])
def test_the_mixed_readers_take_the_keys_of_their_own_data_group(alone, mixed):
    own = reader_of(f"data={alone}")
    nested = reader_of("objective=scdpo", "data=scp")[mixed]
    assert get_class(nested._target_) is get_class(own._target_)
    # alone the path comes from data.path (the reader is a partial); nested, it is the reader's own key
    assert set(nested) - {"path"} == set(own) - {"_partial_"}
    for key in set(own) - {"_target_", "_partial_"}:
        assert nested[key] == own[key], key


def test_data_scp_passes_image_dir_to_the_coprov2_reader(tmp_path):
    import pyarrow.parquet as pq

    from tests.data.test_readers import pickapic_table

    (tmp_path / "train.csv").write_text("prompt,image,category\nx,u_idx_0_0.jpg,hate\ny,s_idx_0_0.jpg,hate\n")
    for name in ("u_idx_0_0.jpg", "s_idx_0_0.jpg"):
        solid_image(tmp_path / "images" / name, (9, 9, 9))
    pq.write_table(pickapic_table(), tmp_path / "pickapic.parquet")
    spec = reader_of("objective=scdpo", "data=scp", f"data.reader.harmful.path={tmp_path / 'train.csv'}",
                     f"data.reader.harmful.image_dir={tmp_path / 'images'}",
                     f"data.reader.clean.path={tmp_path / 'pickapic.parquet'}")
    pairs = instantiate(spec)(None).read()  # the DataModule calls the partial with data.path (null here)
    assert [p.image_l for p in pairs[:1]] == [tmp_path / "images" / "u_idx_0_0.jpg"]
    # harmful_fraction 0.5: one clean pair (of the two Pick-a-Pic pairs, picked by the seed) per harmful one
    assert len(pairs) == 2 and pairs[0].prompt == "x" and pairs[1].prompt in ("keep order", "swap")
