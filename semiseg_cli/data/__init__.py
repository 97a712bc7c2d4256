"""Datasets, splits, paired transforms and the synthetic demo set."""

from semiseg_cli.data.checks import DatasetProblems
from semiseg_cli.data.datasets import SegDataset, build_dataset, derive_tags, load_tags
from semiseg_cli.data.layouts import (
    IGNORE,
    CamVidLayout,
    CityscapesLayout,
    FolderLayout,
    Layout,
    LayoutOptions,
    VocLayout,
    get_layout,
    layout_for,
)
from semiseg_cli.data.demo import generate_demo
from semiseg_cli.data import annotations  # noqa: F401  (registers yolo and coco)
from semiseg_cli.data.splits import (
    amount_dirname,
    draw_split,
    parse_amounts,
    prepare_splits,
    read_split_file,
    write_split_files,
)
from semiseg_cli.data.transforms import EvalTransform, TrainTransform, denormalize

__all__ = [
    "IGNORE",
    "CamVidLayout",
    "CityscapesLayout",
    "DatasetProblems",
    "EvalTransform",
    "FolderLayout",
    "Layout",
    "LayoutOptions",
    "SegDataset",
    "TrainTransform",
    "VocLayout",
    "amount_dirname",
    "build_dataset",
    "denormalize",
    "derive_tags",
    "draw_split",
    "generate_demo",
    "get_layout",
    "layout_for",
    "load_tags",
    "parse_amounts",
    "prepare_splits",
    "read_split_file",
    "write_split_files",
]
