"""Held-out evaluation of the ct_nodule model package on synthetic chest CTs with exact truth.

    .venv/bin/python models/ct_nodule/evaluate.py                # models/ct_nodule/0.1.0, 12 held-out cases

Cases come from `node.synth.write_chest_ct` with seeds 1000.. (training uses 0..31), written as DICOM
and read back with the node's own series loader, then run through the `ct_nodule` plugin exactly as the
node runs it (package loaded and hash-verified by `node.models.load_model`).

Truth: the generator draws each nodule as the voxels within `diameter_mm / 2` of `center_mm` that lie
inside the lung, all set to exactly 30 HU; `truth_masks` rebuilds those voxels from truth.json and the
image (ball ∩ HU == 30), so the reference is exact on the source grid.

Reported: Dice of the union of predicted nodules against the union of true ones, per case and pooled;
per-nodule detection sensitivity by size (a nodule is detected when a predicted nodule overlaps its truth
voxels); false positives per case (predicted nodules overlapping no true one); the error of the longest
diameter and of the volume of detected nodules.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.plugin_api import SeriesVolume, StudyInput
from node.run.series_loader import load_series
from node.synth import write_chest_ct
from plugins.ct_nodule.post import affine

NODULE_HU = 30.0
# (slices, slice thickness mm, rows = columns, pixel spacing mm): 300 mm scans on a 340-360 mm field.
TRAIN_GEOMETRIES = [(120, 2.5, 256, 1.4), (200, 1.5, 240, 1.5), (150, 2.0, 192, 1.85), (240, 1.25, 320, 1.1)]
EVAL_GEOMETRIES = TRAIN_GEOMETRIES + [(160, 1.875, 512, 0.7), (100, 3.0, 288, 1.25)]
EVAL_SEEDS = range(1000, 1012)
SIZE_BINS = [(4.0, 6.0), (6.0, 8.0), (8.0, 10.0), (10.0, 12.0)]
DETECT_MIN_MM = 6.0


@dataclass
class Case:
    seed: int
    geometry: tuple
    volume: SeriesVolume
    headers: list
    nodules: list[dict]  # truth.json's nodules
    masks: list[np.ndarray]  # per nodule, bool, source grid


def make_case(seed: int, geometry: tuple, workdir: Path) -> Case:
    slices, thickness, size, spacing = geometry
    out = Path(workdir) / f"seed{seed}"
    r = write_chest_ct(out, slices=slices, slice_thickness=thickness, rows=size, cols=size,
                       pixel_spacing=spacing, seed=seed, patient_id=f"SYNTH{seed:04d}")
    vol, headers = load_series(r.files)
    for f in r.files:
        f.unlink()
    return Case(seed, geometry, vol, headers, r.truth["nodules"], truth_masks(vol, r.truth["nodules"]))


def truth_masks(vol: SeriesVolume, nodules: list[dict]) -> list[np.ndarray]:
    """Each nodule's voxels on the source grid: within its radius of its centre and exactly 30 HU."""
    a = affine(vol.origin, vol.orientation, vol.spacing)
    inv = np.linalg.inv(a)
    shape = vol.pixels.shape
    out = []
    for n in nodules:
        c = np.asarray(n["center_mm"], float)
        r = n["diameter_mm"] / 2
        ci = inv[:3, :3] @ c + inv[:3, 3]
        half = r / np.asarray(vol.spacing) + 2
        lo = np.maximum(np.floor(ci - half).astype(int), 0)
        hi = np.minimum(np.ceil(ci + half).astype(int) + 1, shape)
        mask = np.zeros(shape, bool)
        if np.any(hi <= lo):
            out.append(mask)
            continue
        k, i, j = np.meshgrid(*(np.arange(l, h) for l, h in zip(lo, hi)), indexing="ij")
        pts = (a[:3, :3] @ np.stack([k.ravel(), i.ravel(), j.ravel()])).T + a[:3, 3]
        inside = (((pts - c) ** 2).sum(axis=1) <= r * r).reshape(k.shape)
        box = tuple(slice(l, h) for l, h in zip(lo, hi))
        mask[box] = inside & (np.abs(vol.pixels[box] - NODULE_HU) < 0.5)
        out.append(mask)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def load_plugin(models: Path, version: str = "0.1.0", device: str = "cpu"):
    from node.models import load_model
    from plugins.ct_nodule import CtNodulePlugin

    plugin = CtNodulePlugin()
    plugin.device = device
    plugin.load_model(load_model(Path(models), "ct_nodule", version))
    return plugin


def score_case(plugin, case: Case, scratch: Path) -> dict:
    t0 = time.perf_counter()
    result = plugin.run(StudyInput(case.volume.headers[0].StudyInstanceUID, [case.volume], scratch))
    seconds = time.perf_counter() - t0
    segs = result.segmentations[0].segments if result.segmentations else []
    pred = np.zeros(case.volume.pixels.shape, bool)
    for s in segs:
        pred |= s.mask
    truth = np.zeros_like(pred)
    for m in case.masks:
        truth |= m
    by_label = {f.segment_label: f for f in result.findings}
    nodules = []
    for n, m in zip(case.nodules, case.masks):
        hits = [s for s in segs if (s.mask & m).any()]
        row = {"diameter_mm": n["diameter_mm"], "side": n["side"], "detected": bool(hits),
               "truth_volume_mm3": float(m.sum()) * case.volume.voxel_volume_mm3}
        if hits:
            f = by_label[hits[0].label]
            vals = {meas.concept.meaning: meas.value for meas in f.measurements}
            row.update(pred_diameter_mm=vals["Long axis"], pred_volume_mm3=vals["Volume"],
                       pred_side=f.finding_site.meaning.split()[0].lower(), confidence=f.confidence)
        nodules.append(row)
    fp = sum(1 for s in segs if not (s.mask & truth).any())
    inter = int((pred & truth).sum())
    return {"seed": case.seed, "geometry": list(case.geometry), "dice": dice(pred, truth), "intersection": inter,
            "pred_voxels": int(pred.sum()), "truth_voxels": int(truth.sum()), "false_positives": fp,
            "nodules": nodules, "seconds": seconds, "timings": dict(result.timings)}


def summarise(rows: list[dict]) -> dict:
    pooled = 2 * sum(r["intersection"] for r in rows) / max(1, sum(r["pred_voxels"] + r["truth_voxels"] for r in rows))
    nods = [n for r in rows for n in r["nodules"]]
    bins = {}
    for lo, hi in SIZE_BINS:
        sel = [n for n in nods if lo <= n["diameter_mm"] < hi or (hi == SIZE_BINS[-1][1] and n["diameter_mm"] >= hi)]
        bins[f"{lo:g}-{hi:g} mm"] = {"n": len(sel), "detected": sum(n["detected"] for n in sel)}
    big = [n for n in nods if n["diameter_mm"] >= DETECT_MIN_MM]
    det = [n for n in nods if n["detected"]]
    return {
        "cases": len(rows),
        "dice_mean": float(np.mean([r["dice"] for r in rows])),
        "dice_min": float(np.min([r["dice"] for r in rows])),
        "dice_pooled": pooled,
        "sensitivity_ge_6mm": sum(n["detected"] for n in big) / max(1, len(big)),
        "nodules_ge_6mm": len(big),
        "sensitivity_all": len(det) / max(1, len(nods)),
        "false_positives_per_case": sum(r["false_positives"] for r in rows) / len(rows),
        "side_correct": sum(n["pred_side"] == n["side"] for n in det) / max(1, len(det)),
        "diameter_abs_error_mm": (float(np.mean([abs(n["pred_diameter_mm"] - n["diameter_mm"]) for n in det]))
                                  if det else None),
        "volume_rel_error": (float(np.mean([abs(n["pred_volume_mm3"] / n["truth_volume_mm3"] - 1) for n in det]))
                             if det else None),
        "by_size": bins,
    }


def print_table(rows: list[dict], s: dict, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{'seed':>5} {'geometry (slices x mm, size @ mm)':<34} {'Dice':>6} {'found':>7} {'FP':>3} {'s':>6}")
    for r in rows:
        sl, th, sz, ps = r["geometry"]
        found = f"{sum(n['detected'] for n in r['nodules'])}/{len(r['nodules'])}"
        sizes = " ".join(f"{n['diameter_mm']:.1f}{'' if n['detected'] else '(missed)'}" for n in r["nodules"])
        p(f"{r['seed']:>5} {f'{sl} x {th:g}, {sz}^2 @ {ps:g}':<34} {r['dice']:>6.3f} {found:>7} "
          f"{r['false_positives']:>3} {r['seconds']:>6.1f}   nodules {sizes} mm")
    p("")
    p(f"{'nodule size':<12} {'n':>3} {'detected':>9} {'sensitivity':>12}")
    for name, b in s["by_size"].items():
        sens = f"{b['detected'] / b['n']:.2f}" if b["n"] else "-"
        p(f"{name:<12} {b['n']:>3} {b['detected']:>9} {sens:>12}")
    p("")
    p(f"Dice: mean {s['dice_mean']:.3f} (min {s['dice_min']:.3f}), pooled {s['dice_pooled']:.3f}")
    p(f"sensitivity >= {DETECT_MIN_MM:g} mm: {s['sensitivity_ge_6mm']:.3f} ({s['nodules_ge_6mm']} nodules); "
      f"all sizes {s['sensitivity_all']:.3f}; false positives per case {s['false_positives_per_case']:.2f}")
    if s["diameter_abs_error_mm"] is not None:
        p(f"detected nodules: longest diameter |error| {s['diameter_abs_error_mm']:.2f} mm (truth: sphere "
          f"diameter), volume |relative error| {100 * s['volume_rel_error']:.1f}%, lung side correct "
          f"{100 * s['side_correct']:.0f}%")


def evaluate(models: Path, version: str = "0.1.0", seeds=EVAL_SEEDS, geometries=EVAL_GEOMETRIES,
             device: str = "cpu", verbose: bool = True) -> tuple[list[dict], dict]:
    plugin = load_plugin(models, version, device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ct_nodule_eval_") as tmp:
        for i, seed in enumerate(seeds):
            case = make_case(seed, geometries[i % len(geometries)], Path(tmp))
            rows.append(score_case(plugin, case, Path(tmp)))
            if verbose:
                r = rows[-1]
                print(f"  case seed {seed}: Dice {r['dice']:.3f}, {r['seconds']:.1f} s", file=sys.stderr)
            del case
    return rows, summarise(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--cases", type=int, default=len(EVAL_SEEDS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the rows and summary here")
    a = ap.parse_args(argv)
    rows, s = evaluate(a.models, a.version, range(EVAL_SEEDS.start, EVAL_SEEDS.start + a.cases), device=a.device)
    print_table(rows, s)
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "summary": s}, indent=2))
    ok = s["sensitivity_ge_6mm"] >= 0.9 and s["dice_mean"] >= 0.7
    print(f"target (sensitivity >= 0.9 for nodules >= 6 mm, Dice >= 0.7): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
