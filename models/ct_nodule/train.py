"""Train the ct_nodule demonstration model on synthetic chest CTs and write its model package.

    .venv/bin/python models/ct_nodule/train.py                   # writes models/ct_nodule/0.1.0/

The shipped 0.1.0 was made by exactly that command (no arguments) with torch 2.13.0+cpu on a 2-core x86-64
CPU shared with other jobs: 10 min 36 s wall in all (data 78 s, training 386 s for 500 steps, held-out
evaluation 168 s; unloaded about 9.5 min). Two runs gave the same losses step for step: the run is
deterministic for a given torch build and thread count (fixed seeds, --threads 2).

Data: `node.synth.write_chest_ct`, seeds 0..TRAIN_CASES-1, cycling through four scan geometries of ~300 mm
(2.5 mm slices at 1.4 mm pixels, 1.5/1.5, 2.0/1.85, 1.25/1.1; 192-320 pixels square). Each case holds the
generator's three nodules (two in the left lung, one in the right, at about 35%, 50% and 65% of the scan
length, diameters uniform in 4-12 mm, position within the lung varied by the seed), plus the vessels
(soft-tissue tubes along the scan, 2.4-6 mm wide: the look-alikes the model must learn to reject). The
generator does not vary the nodule count, so the seed is the only source of variety: 32 cases give 96
nodules. Each case is written as DICOM, read back with the node's series loader, and pre-processed with
the plugin's own `prepare` (body crop, HU window, resampling to the model spacing), so training sees the
very input the plugin will give the network. The target is the exact nodule mask (the generator's
ball ∩ 30 HU, see evaluate.truth_masks) resampled the same way: a soft 0..1 target at model spacing.

Training: 3-D U-Net (plugins/ct_nodule/net.py, base 8 channels) on random patches: half centred near a
nodule, a third in the lungs (vessels, lung edges), the rest anywhere in the body; random flips.
Loss BCE (positive voxels weighted 4x) + soft Dice, Adam with warm-up and a final cosine decay, fixed
seeds. Then the network is TorchScript-scripted, saved, hashed into manifest.yaml, evaluated on held-out
seeds (evaluate.py), and the held-out figures are written into the manifest's metrics.

A version folder is immutable once published: the script refuses to write into an existing one unless
--overwrite is given (for re-running before the version is committed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluate  # noqa: E402  (models/ct_nodule/evaluate.py)
from plugins.ct_nodule.infer import prepare, to_model_grid  # noqa: E402
from plugins.ct_nodule.net import NoduleUNet  # noqa: E402

NAME, VERSION = "ct_nodule", "0.1.0"
SPACING_MM = (1.5, 1.5, 1.5)
PATCH = (64, 64, 64)  # inference window (manifest input.patch_size)
TRAIN_PATCH = (32, 48, 48)
HU_WINDOW = (-1000.0, 400.0)
BASE_CHANNELS = 8
TRAIN_CASES = 32
STEPS = 500
BATCH = 4
LR = 3e-3
POS_WEIGHT = 4.0
WARMUP, DECAY_FROM = 20, 0.6  # linear warm-up steps; cosine decay to LR/20 over the last 40% of the steps
SEED = 20260115
P_NODULE, P_LUNG = 0.5, 0.35  # patch centre: near a nodule / in the lungs / anywhere (the rest)
LUNG_WINDOW = ((-960.0 - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]),
               (-600.0 - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]))


def build_case(seed: int, workdir: Path) -> dict:
    case = evaluate.make_case(seed, evaluate.TRAIN_GEOMETRIES[seed % len(evaluate.TRAIN_GEOMETRIES)], workdir)
    vol = case.volume
    prep = prepare(vol.pixels, vol.spacing, SPACING_MM, HU_WINDOW, "cpu")
    truth = np.zeros(vol.pixels.shape, np.float32)
    for m in case.masks:
        truth[m] = 1.0
    target = to_model_grid(torch.from_numpy(np.ascontiguousarray(truth[prep.box])), prep.model_shape)
    image = prep.image.numpy()
    lung = np.argwhere((image[::3, ::3, ::3] > LUNG_WINDOW[0]) & (image[::3, ::3, ::3] < LUNG_WINDOW[1])) * 3
    # Nodule centres on the model grid (centre of mass of each nodule's resampled mask).
    centres = []
    for m in case.masks:
        if m.any():
            idx = np.argwhere(m).mean(axis=0) - [s.start for s in prep.box]
            centres.append(np.round(idx * np.asarray(prep.model_shape) / np.asarray(prep.crop_shape)).astype(int))
    return {"image": image.astype(np.float16), "target": target.numpy().astype(np.float16),
            "lung": lung, "centres": centres, "diameters": [n["diameter_mm"] for n in case.nodules]}


def sample_patch(case: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = np.asarray(case["image"].shape)
    patch = np.asarray(TRAIN_PATCH)
    u = rng.random()
    if u < P_NODULE and case["centres"]:
        c = case["centres"][rng.integers(len(case["centres"]))] + rng.integers(-patch // 3, patch // 3 + 1)
    elif u < P_NODULE + P_LUNG and len(case["lung"]):
        c = case["lung"][rng.integers(len(case["lung"]))]
    else:
        c = rng.integers(0, shape)
    start = np.clip(c - patch // 2, 0, np.maximum(shape - patch, 0))
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    img, tgt = case["image"][sl].astype(np.float32), case["target"][sl].astype(np.float32)
    pad = [(0, p - n) for p, n in zip(patch, img.shape)]
    if any(b for _, b in pad):
        img, tgt = np.pad(img, pad), np.pad(tgt, pad)
    for axis in (1, 2):  # in-plane flips (left/right, anterior/posterior)
        if rng.random() < 0.5:
            img, tgt = np.flip(img, axis), np.flip(tgt, axis)
    return np.ascontiguousarray(img), np.ascontiguousarray(tgt)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Nodule voxels are ~0.1% of a patch: without the positive weight the network settles on "no nodule".
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(POS_WEIGHT))
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def train(cases: list[dict], steps: int, log=print) -> tuple[NoduleUNet, list[float]]:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    net = NoduleUNet(BASE_CHANNELS)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    def lr_factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        t = (step - DECAY_FROM * steps) / max(1.0, (1 - DECAY_FROM) * steps)
        return 1.0 if t <= 0 else 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    net.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        pairs = [sample_patch(cases[rng.integers(len(cases))], rng) for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"  step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    net.eval()
    return net, losses


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def manifest_dict(weights_sha: str, training: dict, metrics: dict) -> dict:
    return {
        "name": NAME,
        "version": VERSION,
        "description": "demonstration model, not for clinical use",
        "intended_use": ("Demonstration and testing of the ainode pipeline: segments and measures solid lung "
                         "nodule candidates on chest CT. Trained on synthetic CTs only (node.synth); its "
                         "figures hold for that generator and say nothing about real patients. Not a "
                         "medical device; not for diagnosis or any clinical decision."),
        "not_for_clinical_use": True,
        "format": "torchscript",
        "weights": [{"file": "model.pt", "sha256": weights_sha}],
        "input": {"spacing_mm": list(SPACING_MM), "patch_size": list(PATCH), "hu_window": list(HU_WINDOW)},
        "labels": [{
            "value": 1, "label": "Nodule",
            "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"},
            "type": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
        }],
        "training": training,
        "metrics": metrics,
    }


def write_manifest(folder: Path, data: dict) -> None:
    (folder / "manifest.yaml").write_text(
        "# ct_nodule model package, written by models/ct_nodule/train.py. A version is immutable: changed\n"
        "# weights or manifest are a new version.\n" + yaml.safe_dump(data, sort_keys=False, width=110))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the ct_nodule demonstration model (synthetic data).")
    ap.add_argument("--out", type=Path, default=HERE / VERSION, help="the version folder to write")
    ap.add_argument("--cases", type=int, default=TRAIN_CASES)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--eval-cases", type=int, default=len(evaluate.EVAL_SEEDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing (unpublished) version folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out: Path = a.out
    if (out.parent.name, out.name) != (NAME, VERSION):
        print(f"--out must be <models root>/{NAME}/{VERSION}, not {out}", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        print(f"{out} exists: a published version is immutable. Train into a new version folder, or pass "
              "--overwrite to replace one that was never published.", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    print(f"generating {a.cases} synthetic training cases (seeds 0..{a.cases - 1})")
    with tempfile.TemporaryDirectory(prefix="ct_nodule_train_") as tmp:
        cases = [build_case(seed, Path(tmp)) for seed in range(a.cases)]
    t_data = time.perf_counter() - t_start
    n_nod = sum(len(c["diameters"]) for c in cases)
    print(f"  {n_nod} nodules, {sum(c['image'].size for c in cases) / 1e6:.0f} M voxels at {SPACING_MM} mm "
          f"({t_data:.0f} s)")
    print(f"training {a.steps} steps of {BATCH} patches {TRAIN_PATCH}")
    net, losses = train(cases, a.steps)
    t_train = time.perf_counter() - t_start - t_data
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    weights = buf.getvalue()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(weights)
    args = [str(Path(__file__).relative_to(HERE.parents[1])), *(argv if argv is not None else sys.argv[1:])]
    command = "python " + " ".join(shlex.quote(x) for x in args)
    training = {
        "script": "models/ct_nodule/train.py",
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": (f"synthetic chest CTs from node.synth.write_chest_ct, seeds 0..{a.cases - 1} "
                 f"({n_nod} nodules of 4-12 mm), geometries (slices, mm, pixels, mm) "
                 f"{[list(g) for g in evaluate.TRAIN_GEOMETRIES]}"),
        "network": f"3-D U-Net, 3 levels, {BASE_CHANNELS}/{2 * BASE_CHANNELS}/{4 * BASE_CHANNELS} channels, "
                   f"{sum(p.numel() for p in net.parameters())} parameters",
        "patch_size": list(TRAIN_PATCH),
        "batch_size": BATCH,
        "steps": a.steps,
        "loss": f"BCE (positive weight {POS_WEIGHT:g}) + soft Dice (over the batch)",
        "optimizer": f"Adam, learning rate {LR:g} ({WARMUP}-step warm-up, cosine decay to {LR / 20:g} over the "
                     f"last {100 * (1 - DECAY_FROM):.0f}% of the steps)",
        "seed": SEED,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "torch": str(torch.__version__),
        "host": f"{platform.machine()}, {a.threads} threads, CPU",
    }
    write_manifest(out, manifest_dict(sha256_bytes(weights), training, {}))
    print(f"evaluating on {a.eval_cases} held-out cases (seeds {evaluate.EVAL_SEEDS.start}..)")
    t_eval0 = time.perf_counter()
    rows, summary = evaluate.evaluate(out.parent.parent, VERSION,
                                      range(evaluate.EVAL_SEEDS.start, evaluate.EVAL_SEEDS.start + a.eval_cases))
    evaluate.print_table(rows, summary)
    t_eval = time.perf_counter() - t_eval0
    training.update(data_s=round(t_data), train_s=round(t_train), evaluate_s=round(t_eval),
                    runtime_s=round(time.perf_counter() - t_start))
    metrics = {
        "held_out": f"{len(rows)} synthetic cases, seeds {evaluate.EVAL_SEEDS.start}.."
                    f"{evaluate.EVAL_SEEDS.start + len(rows) - 1}, "
                    f"geometries {[list(g) for g in evaluate.EVAL_GEOMETRIES]}",
        "dice_mean": round(summary["dice_mean"], 3),
        "dice_min": round(summary["dice_min"], 3),
        "dice_pooled": round(summary["dice_pooled"], 3),
        "sensitivity_ge_6mm": round(summary["sensitivity_ge_6mm"], 3),
        "nodules_ge_6mm": summary["nodules_ge_6mm"],
        "sensitivity_all_sizes": round(summary["sensitivity_all"], 3),
        "false_positives_per_case": round(summary["false_positives_per_case"], 2),
        "longest_diameter_abs_error_mm": round(summary["diameter_abs_error_mm"] or 0.0, 2),
        "volume_abs_relative_error": round(summary["volume_rel_error"] or 0.0, 3),
        "sensitivity_by_size": {k: v for k, v in summary["by_size"].items()},
    }
    write_manifest(out, manifest_dict(sha256_bytes(weights), training, metrics))
    print(f"wrote {out / 'model.pt'} ({len(weights) / 1e6:.2f} MB) and {out / 'manifest.yaml'}; "
          f"total {training['runtime_s']} s (data {training['data_s']} s, training {training['train_s']} s, "
          f"evaluation {training['evaluate_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
