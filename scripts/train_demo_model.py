"""Train the DEMO segmentation model on synthetic knee phantoms with nnU-Net's own trainer (CPU).

The shipped model was built in two runs (about 75 min on one shared CPU core in all):

    python scripts/train_demo_model.py --spacing 1,1,1 --patch 80,40,40 --out /tmp/demo1mm
    python scripts/train_demo_model.py --epochs 60 --init /tmp/demo1mm
    python scripts/train_demo_model.py --epochs 2 --iters 5 --out /tmp/demo_check  # smoke run

Steps: generate right-knee phantoms (``pipeline.synthetic.phantom``, varied grids, thicknesses,
noise, bias and in-plane obliquity) as an nnU-Net raw dataset; fingerprint, plan (ResEnc-M planner)
and preprocess with nnunetv2's Python API, replacing the planner's GPU-sized 3d_fullres
configuration by a tiny CPU one (default 1 × 0.7 × 0.7 mm, 80×56×56 patches, 8-64 features);
train fold ``all`` with a no-mirroring trainer (mirroring makes medial/lateral
indistinguishable); pack a slim checkpoint (no optimizer state, ``trainer_name`` =
nnUNetTrainer so any nnunetv2 can load it) into ``assets/models/demo_phantom/``; evaluate Dice
on unseen phantoms through ``pipeline.segment``. The model is a toy: it has never seen a real
MRI.

The phantoms are mirror-symmetric, so only context tells medial from lateral: the patch spans
80 mm medial-lateral, and separating the compartments took ~100 epochs (50 epochs of 40³
patches never did). At 1 mm the model lost ~0.3 mm of cartilage on each side of the 1.2 mm
lateral joint space of 0.6 mm scans; the 0.7 mm in-plane fine-tune fixed that (all regional
means within 0.14 mm of the designed thickness on unseen phantoms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID}_KneePhantom"
PLANNER = "nnUNetPlannerResEncM"
PLANS = "nnUNetResEncUNetMPlans"
CONFIG = "3d_fullres"
FOLD = "all"
ENV_THREADS = "KNEE_TORCH_THREADS"


def phantom_spec(rng, seed: int, *, fine: bool = False):
    """A random right-knee phantom on a random sagittal (PIR) grid covering the joint."""
    from pipeline.synthetic.phantom import PhantomSpec

    if fine:
        spacing = (1.0, 1.0, 1.0)
    else:
        inplane = float(rng.uniform(0.6, 1.2))
        spacing = (inplane, inplane, float(rng.uniform(0.8, 1.5)))
    fov = rng.uniform(96.0, 120.0, size=3)
    size = tuple(int(round(f / s)) for f, s in zip(fov, spacing, strict=True))
    return PhantomSpec(
        size=size, spacing=spacing, seed=seed, side="right",
        fem_cart_mm=tuple(float(v) for v in rng.uniform(1.5, 3.0, 2)),
        tib_cart_mm=tuple(float(v) for v in rng.uniform(1.5, 3.0, 2)),
        tib_dome=float(rng.uniform(0.0, 0.3)),
        pat_cart_mm=float(rng.uniform(2.0, 3.5)),
        noise=float(rng.uniform(0.01, 0.05)),
        bias=float(rng.uniform(0.0, 0.2)),
        oblique_deg=float(rng.uniform(-10.0, 10.0)),
    )


def write_raw(raw: Path, n_cases: int, seed: int) -> None:
    import numpy as np
    import SimpleITK as sitk

    from pipeline import labels as L
    from pipeline.synthetic import phantom

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        ph = phantom.generate(phantom_spec(rng, seed * 1000 + i))
        sitk.WriteImage(ph.image, str(folder / "imagesTr" / f"knee_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(ph.labels, str(folder / "labelsTr" / f"knee_{i:03d}.nii.gz"))
    labels = {"background": 0, **{name: value for value, name in L.LABEL_NAMES.items()}}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": labels, "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "description": "synthetic knee phantoms (pipeline.synthetic.phantom); DEMO model only",
    }, indent=1))


def plan_and_preprocess(pre: Path, patch: list[int], spacing: list[float], procs: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], num_processes=procs, check_dataset_integrity=True)
    plan_experiments([DATASET_ID], PLANNER)
    plans_file = pre / DATASET / f"{PLANS}.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][CONFIG]
    # The planner sizes networks for a GPU; a CPU demo needs a tiny one.
    cfg.update(spacing=list(spacing), patch_size=list(patch), batch_size=2)
    cfg["architecture"]["arch_kwargs"].update(
        n_stages=4, features_per_stage=[8, 16, 32, 64], kernel_sizes=[[3, 3, 3]] * 4,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], n_blocks_per_stage=[1, 1, 1, 1],
        n_conv_per_stage_decoder=[1, 1, 1],
    )
    plans["configurations"] = {CONFIG: cfg}
    plans_file.write_text(json.dumps(plans, indent=1))
    preprocess([DATASET_ID], PLANS, configurations=(CONFIG,), num_processes=(procs,))


def train(
    results: Path, pre: Path, epochs: int, iters: int, rotation_deg: float,
    init: Path | None = None,
) -> Path:
    import numpy as np
    import torch
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (  # noqa: E501
        nnUNetTrainerNoMirroring,
    )

    CPU = torch.device("cpu")

    class nnUNetTrainerDemoCPU(nnUNetTrainerNoMirroring):
        # Explicit parameters: nnU-Net records them from the signature for the checkpoint.
        def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                     device: torch.device = CPU):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iters
            self.num_val_iterations_per_epoch = 5
            self.save_every = 10**6  # only the final checkpoint

        def plot_network_architecture(self):
            pass  # needs hiddenlayer/graphviz; irrelevant here

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            # Phantoms are stored like scans (small obliquity only): +-30 degrees of rotation
            # about every axis, nnU-Net's default, mostly slows learning here.
            base = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            _, dummy_2d, _, mirror = base
            rotation = (-np.deg2rad(rotation_deg), np.deg2rad(rotation_deg))
            patch = self.configuration_manager.patch_size
            initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
            return rotation, dummy_2d, initial, mirror

    plans = json.loads((pre / DATASET / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # the 2.8 trainer pops this key
    dataset_json = json.loads((pre / DATASET / "dataset.json").read_text())
    trainer = nnUNetTrainerDemoCPU(plans, CONFIG, FOLD, dataset_json, device=torch.device("cpu"))
    if init is not None:  # continue from earlier weights with a fresh schedule
        if init.is_dir():
            init = next(init.rglob("checkpoint_final.pth"))
        trainer.initialize()
        weights = torch.load(init, map_location="cpu", weights_only=False)["network_weights"]
        trainer.network.load_state_dict(weights)
    trainer.run_training()
    return Path(trainer.output_folder) / "checkpoint_final.pth"


def pack(checkpoint: Path, pre: Path, out: Path) -> Path:
    """Slim, portable copy: weights + what nnUNetPredictor reads, nothing to resume training."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    folder = out / DATASET / f"nnUNetTrainer__{PLANS}__{CONFIG}"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / f"fold_{FOLD}").mkdir(parents=True)
    init = dict(ckpt["init_args"])
    init["device"] = "cpu"
    init["plans"] = {k: v for k, v in init["plans"].items() if k != "continue_training"}
    torch.save(
        {
            "network_weights": ckpt["network_weights"],
            "init_args": init,
            # The subclass only changed the training schedule, not the network.
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": None,
            "current_epoch": ckpt["current_epoch"],
        },
        folder / f"fold_{FOLD}" / "checkpoint_final.pth",
    )
    plans = json.loads((pre / DATASET / f"{PLANS}.json").read_text())
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    shutil.copy(pre / DATASET / "dataset.json", folder / "dataset.json")
    return folder


def evaluate(model_dir: Path, n_cases: int, seed: int) -> dict:
    """Dice per label on unseen phantoms, through the app's own segmentation code."""
    from dataclasses import replace

    import numpy as np
    import SimpleITK as sitk

    from pipeline import labels as L
    from pipeline import models
    from pipeline.errors import PipelineError
    from pipeline.inputs import LoadedImage
    from pipeline.segment import Segmenter
    from pipeline.synthetic import phantom

    # The registry entry (with its post-processing), pointed at this folder.
    spec = replace(models.REGISTRY["demo_phantom"], local_dir=model_dir)
    rng = np.random.default_rng(seed)
    per_label: dict[int, list[float]] = {v: [] for v in L.SEG_LABELS}
    segmenter = Segmenter()
    for i in range(n_cases):
        ph = phantom.generate(phantom_spec(rng, seed * 1000 + i, fine=i % 2 == 0))
        loaded = LoadedImage(sitk.Cast(ph.image, sitk.sitkFloat32), f"eval{i}", "nii.gz")
        try:
            seg, _ = segmenter(loaded, spec)
        except PipelineError as exc:  # e.g. no tibia found: scores 0 rather than aborting
            print(f"eval case {i}: {exc}")
            seg = sitk.Image(ph.labels.GetSize(), sitk.sitkUInt8)
        pred = sitk.GetArrayFromImage(seg)
        truth = sitk.GetArrayFromImage(ph.labels)
        for v in L.SEG_LABELS:
            a, b = pred == v, truth == v
            per_label[v].append(2.0 * np.sum(a & b) / max(1, a.sum() + b.sum()))
    means = {L.LABEL_NAMES[v]: round(float(np.mean(d)), 4) for v, d in per_label.items()}
    return {"cases": n_cases, "dice": means, "mean": round(float(np.mean(list(means.values()))), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "models" / "demo_phantom")
    ap.add_argument("--work", type=Path, default=Path("/tmp/knee_demo_nnunet"))
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--iters", type=int, default=40, help="iterations per epoch")
    ap.add_argument("--patch", default="80,56,56",
                    help="patch size (voxels, multiples of 8) in array order; the first axis is "
                    "medial-lateral for sagittal scans, so one patch sees both compartments")
    ap.add_argument("--spacing", default="1.0,0.7,0.7",
                    help="target spacing (mm) in array order (M/L, S/I, A/P): finer than 1 mm "
                    "in-plane, or 0.6 mm scans lose ~0.3 mm of cartilage at narrow joint spaces")
    ap.add_argument("--rotation", type=float, default=10.0, help="rotation augmentation (deg)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on shared hosts)")
    ap.add_argument("--procs", type=int, default=2, help="preprocessing / augmentation workers")
    ap.add_argument("--eval-cases", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init", type=Path,
                    help="start from this checkpoint's weights (or the one in this --out folder)")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="only re-evaluate the model in --out and update its model card")
    args = ap.parse_args(argv)

    if args.evaluate_only:
        os.environ[ENV_THREADS] = str(args.threads)
        card_path = args.out / "model_card.json"
        card = json.loads(card_path.read_text())
        card["evaluation_unseen_phantoms"] = evaluate(
            args.out / DATASET, args.eval_cases, seed=args.seed + 100)
        card_path.write_text(json.dumps(card, indent=1))
        print(json.dumps(card["evaluation_unseen_phantoms"], indent=1))
        return 0

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    raw, pre, results = work / "raw", work / "preprocessed", work / "results"
    for p in (raw, pre, results):
        p.mkdir(parents=True)
    os.environ.update(
        nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(results),
        nnUNet_def_n_proc=str(args.procs), nnUNet_n_proc_DA=str(args.procs),
        **{ENV_THREADS: str(args.threads)},
    )
    import torch

    torch.set_num_threads(args.threads)
    times = {}
    t0 = time.perf_counter()
    write_raw(raw, args.cases, args.seed)
    times["phantoms"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    patch = [int(v) for v in args.patch.split(",")]
    spacing = [float(v) for v in args.spacing.split(",")]
    plan_and_preprocess(pre, patch, spacing, args.procs)
    times["plan_preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoint = train(results, pre, args.epochs, args.iters, args.rotation, args.init)
    times["train"] = time.perf_counter() - t0
    folder = pack(checkpoint, pre, args.out)
    t0 = time.perf_counter()
    report = evaluate(folder.parent, args.eval_cases, seed=args.seed + 100)
    times["evaluate"] = time.perf_counter() - t0
    card = {
        "name": "demo_phantom",
        "warning": "DEMO ONLY: trained on synthetic phantoms (pipeline/synthetic/phantom.py), "
        "right knees, sagittal PIR-stored grids; meaningless on real MRI.",
        "dataset": DATASET, "plans": PLANS, "configuration": CONFIG, "fold": FOLD,
        "trainer": "nnUNetTrainerNoMirroring subclass (saved as nnUNetTrainer)",
        "postprocessing": "registry entry keeps the largest component of every label",
        "training": {"cases": args.cases, "epochs": args.epochs, "iterations_per_epoch": args.iters,
                     "patch": patch, "spacing": spacing, "rotation_deg": args.rotation,
                     "threads": args.threads, "seed": args.seed,
                     "init": str(args.init) if args.init else None},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "evaluation_unseen_phantoms": report,
        "built_with": {"script": "scripts/train_demo_model.py",
                       **segment_versions()},
    }
    (args.out / "model_card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card, indent=1))
    return 0


def segment_versions() -> dict:
    from importlib import metadata

    return {d: metadata.version(d) for d in ("nnunetv2", "torch")}


if __name__ == "__main__":
    sys.exit(main())
