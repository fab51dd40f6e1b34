import pytest

from vllm_nsa.config import NSAConfig, NSAConfigError


def test_paper_defaults():
    cfg = NSAConfig()
    assert (cfg.compress_block, cfg.compress_stride, cfg.select_block, cfg.select_topk,
            cfg.init_blocks, cfg.local_blocks, cfg.window, cfg.compress_op) == (
        32, 16, 64, 16, 1, 2, 512, "mean")


@pytest.mark.parametrize("kwargs,message", [
    (dict(compress_block=24, compress_stride=16),
     "compress_stride=16 must divide compress_block=24"),
    (dict(compress_block=32, compress_stride=16, select_block=40), "must divide select_block=40"),
    (dict(compress_block=128, compress_stride=16, select_block=64),
     "compress_block=128 must be <= select_block=64"),
    (dict(select_topk=2), "select_topk=2 must be >= init_blocks \\+ local_blocks = 3"),
    (dict(window=-1), "window=-1 must be >= 0"),
    (dict(local_blocks=0), "local_blocks=0 must be >= 1"),
    (dict(compress_stride=0), "compress_stride=0 must be >= 1"),
    (dict(select_topk=4.0), "select_topk=4.0 must be an integer"),
    (dict(compress_op="mlp"), "compress_op='mlp' is not supported; supported: mean"),
])
def test_validation_names_the_value(kwargs, message):
    with pytest.raises(NSAConfigError, match=message):
        NSAConfig(**kwargs)


def test_from_fla_config():
    fla = {"model_type": "nsa", "block_size": 64, "block_counts": 16, "window_size": 512}
    cfg = NSAConfig.from_hf_config(fla)
    assert (cfg.compress_block, cfg.compress_stride, cfg.select_block, cfg.select_topk,
            cfg.window) == (64, 64, 64, 16, 512)


def test_from_explicit_fields_and_dict():
    cfg = NSAConfig.from_hf_config({"compress_block": 16, "compress_stride": 8,
                                    "select_block": 32, "window": 0})
    assert (cfg.compress_block, cfg.compress_stride, cfg.select_block, cfg.window) == (16, 8, 32, 0)
    assert NSAConfig.from_dict({"window": 256}).window == 256
    with pytest.raises(NSAConfigError, match="unknown NSA parameter"):
        NSAConfig.from_dict({"windw": 256})


def test_from_object_without_nsa_fields_gives_defaults():
    class Dense:
        hidden_size = 64
    assert NSAConfig.from_hf_config(Dense()) == NSAConfig()


def test_selection_score():
    assert NSAConfig().selection_score == "compressed"        # the paper's; NSA checkpoints
    assert NSAConfig.from_hf_config({"block_size": 64}).selection_score == "compressed"
    dense = NSAConfig.for_dense_model(None)
    assert dense.selection_score == "bounds" and dense.uses_bounds
    assert dense == NSAConfig(selection_score="bounds")
    assert NSAConfig.for_dense_model({"selection_score": "compressed"}) == NSAConfig()
    assert "selection_score=bounds" in dense.describe()
    with pytest.raises(NSAConfigError, match="selection_score='quest' is not supported; "
                                             "supported: compressed, bounds"):
        NSAConfig.for_dense_model({"selection_score": "quest"})
    assert [dense.bounds_per_page(p) for p in (16, 64, 128)] == [1, 1, 2]
    assert dense.bounds_entry_end(2) == 191 and dense.num_bounded(191) == 2
