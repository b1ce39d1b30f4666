"""Tiny nnU-Net v2 trained-model folders (random weights, real layout, seconds to build): for
tests, ``scripts/build_tiny_nnunet.py`` and ``scripts/benchmark_segmentation.py``.

The folders look like the published ``aagatti/nnunet_knee`` ones:
``<root>/<dataset>/<trainer>__<plans>__<configuration>/{dataset.json, plans.json,
fold_<f>/<checkpoint>}``. Plans and networks come from nnunetv2's own classes, and the
checkpoint holds exactly the keys ``nnUNetPredictor`` reads (as a slim published checkpoint).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

# Names as in the published model's dataset.json (sequential 0-9).
KNEE_LABELS: dict[str, int] = {
    "background": 0,
    "patellar_cartilage": 1,
    "femoral_cartilage": 2,
    "medial_tibial_cartilage": 3,
    "lateral_tibial_cartilage": 4,
    "medial_meniscus": 5,
    "lateral_meniscus": 6,
    "femur": 7,
    "tibia": 8,
    "patella": 9,
}

TRAINER = "nnUNetTrainer"
PLANS = "nnUNetResEncUNetMPlans"
DATASET = "Dataset500_KneeMRI"

_ARCH_KWARGS = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_blocks_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def _configuration(spacing: list[float], patch: list[int], identifier: str) -> dict:
    return {
        "data_identifier": identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [48, 64, 64],
        "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                      "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                     "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": {
            "network_class_name":
                "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": copy.deepcopy(_ARCH_KWARGS),
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }


def make_plans(dataset: str = DATASET, plans_name: str = PLANS) -> dict:
    """Plans with 3d_fullres (2 mm, 32³ patches), 3d_lowres (4 mm, 16³) and the cascade."""
    fullres = _configuration([2.0, 2.0, 2.0], [32, 32, 32], f"{plans_name}_3d_fullres")
    lowres = _configuration([4.0, 4.0, 4.0], [16, 16, 16], f"{plans_name}_3d_lowres")
    lowres["next_stage"] = "3d_cascade_fullres"
    return {
        "dataset_name": dataset,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": [2.0, 1.5, 1.5],
        "original_median_shape_after_transp": [48, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": fullres,
            "3d_lowres": lowres,
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "nnUNetPlannerResEncM",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1000.0, "mean": 400.0, "median": 400.0, "min": 0.0,
                  "percentile_00_5": 5.0, "percentile_99_5": 900.0, "std": 200.0},
        },
    }


def make_dataset_json(labels: dict[str, int] | None = None) -> dict:
    return {
        "channel_names": {"0": "MRI"},
        "labels": dict(labels or KNEE_LABELS),
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }


def write_stage(
    dataset_dir: Path,
    configuration: str,
    *,
    labels: dict[str, int] | None = None,
    fold: int | str = 1,
    checkpoint: str = "checkpoint_best.pth",
    seed: int = 0,
    bias: dict[int, float] | None = None,
    plans: dict | None = None,
    trainer: str = TRAINER,
    plans_name: str = PLANS,
    optimizer_state: bool = False,
) -> Path:
    """Write one trained-model folder; ``bias`` adds to output-channel biases (model values).

    ``optimizer_state`` also stores SGD momentum buffers, as nnU-Net's own (unslimmed) training
    checkpoints do: about twice the file size, read but unused by the predictor.
    """
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = plans or make_plans(dataset_dir.name, plans_name)
    dj = make_dataset_json(labels)
    folder = dataset_dir / f"{trainer}__{plans_name}__{configuration}"
    (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dj, indent=1))

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dj)
    n_out = pm.get_label_manager(dj).num_segmentation_heads
    torch.manual_seed(seed)
    cls = recursive_find_trainer_class_by_name("nnUNetTrainer")
    net = cls.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
    if bias:
        with torch.no_grad():
            for channel, value in bias.items():
                net.decoder.seg_layers[-1].bias[channel] += value
    content = {
        "network_weights": net.state_dict(),
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                      "dataset_json": dj, "device": "cpu"},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 1,
    }
    if optimizer_state:  # nnUNetTrainer's optimizer: SGD, momentum 0.99, Nesterov
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, weight_decay=3e-5, momentum=0.99,
                                    nesterov=True)
        for p in net.parameters():
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        content["optimizer_state"] = optimizer.state_dict()
    torch.save(content, folder / f"fold_{fold}" / checkpoint)
    return folder


def write_dataset(
    root: Path,
    configurations: tuple[str, ...] = ("3d_lowres", "3d_cascade_fullres", "3d_fullres"),
    *,
    dataset: str = DATASET,
    labels: dict[str, int] | None = None,
    bias: dict[int, float] | None = None,
) -> Path:
    """A Dataset folder holding the given configurations (as the Hub repo's ``models/``)."""
    dataset_dir = Path(root) / dataset
    plans = make_plans(dataset)
    for i, cfg in enumerate(configurations):
        write_stage(dataset_dir, cfg, labels=labels, seed=i, bias=bias, plans=plans)
    return dataset_dir
