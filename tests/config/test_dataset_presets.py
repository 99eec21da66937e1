"""The --dataset presets (config/options.py DATASET_PRESETS, describe_dataset): the run header's line."""
from config.options import DATASETS, DATASET_PRESETS, describe_dataset, parse_args
from data_generator.formats import BENCHMARKS, CIFAR100_SPLITS


def test_presets_cover_the_benchmarks_and_agree_with_the_stored_splits():
    assert set(BENCHMARKS) == set(DATASET_PRESETS) <= set(DATASETS)
    assert DATASET_PRESETS["CIFAR-FS"]["classes"] == tuple(len(CIFAR100_SPLITS["CIFAR-FS"][s])
                                                           for s in ("train", "val", "test"))
    f2c = CIFAR100_SPLITS["fine_to_coarse"]
    assert DATASET_PRESETS["FC100"]["classes"] == tuple(
        sum(c in CIFAR100_SPLITS["FC100"][s] for c in f2c.values()) for s in ("train", "val", "test"))
    for name, p in DATASET_PRESETS.items():  # 600 images per class in mini, FC100, CIFAR-FS
        if name != "tieredImageNet":
            assert p["images"] == tuple(600 * c for c in p["classes"]), name
    assert sum(DATASET_PRESETS["tieredImageNet"]["images"]) == 779_165


def test_header_line_states_the_official_input():
    pt = describe_dataset(parse_args(["--dataset", "FC100"]))
    assert pt.startswith("dataset FC100 preset: 32-px images upsampled, stored at 92 px, centre crop 80 "
                         "(--preprocess pytorch)")
    assert "published split 60/20/20 classes; pre-train classes read from the data" in pt
    tf = describe_dataset(parse_args(["--dataset", "CIFAR-FS", "--recipe", "paper"]))
    assert "32-px images upsampled, stored at 84 px (--preprocess paper)" in tf and "64/16/20" in tf
    odd = describe_dataset(parse_args(["--dataset", "miniImageNet", "--image_size", "64"]))
    assert "the official pytorch input is 80" in odd
    assert describe_dataset(parse_args(["--dataset", "custom"])).startswith("dataset custom (no preset")
