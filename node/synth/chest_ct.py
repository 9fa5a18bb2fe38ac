"""A synthetic chest CT with known anatomy, so accuracy can be measured against exact truth.

Body outline with a fat layer, ribs, spine, mediastinum, two lungs at about -850 HU that taper
towards apex and base, a trachea that splits into two main bronchi which reach the lungs, and a few
soft-tissue nodules inside the lungs. The truth file holds the exact lung volumes (voxel counts of
the generated lung masks, nodules included) and the nodules' centres and diameters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
    generate_uid,
)

SUPPORTED_SYNTAXES = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "ImplicitVRLittleEndian": ImplicitVRLittleEndian,
    "ExplicitVRBigEndian": ExplicitVRBigEndian,
    "DeflatedExplicitVRLittleEndian": DeflatedExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEG2000Lossless": JPEG2000Lossless,
    "JPEGLSLossless": JPEGLSLossless,
}
COMPRESSED = {RLELossless, JPEG2000Lossless, JPEGLSLossless}

INTERCEPT = -1024.0

# Anatomy in mm, patient coordinates (LPS): +x is the patient's left, +y posterior.
BODY_A, BODY_B = 170.0, 125.0
FAT_MM = 10.0
RIB_A, RIB_B, RIB_HALF_WIDTH = 150.0, 107.0, 3.5
SPINE_Y, SPINE_R = 82.0, 18.0
LUNG_X, LUNG_Y = 80.0, 5.0
LUNG_AX, LUNG_AY = 55.0, 80.0
LUNG_TOP, LUNG_BOTTOM = 0.06, 0.94  # fraction of the scanned length
CARINA = 0.30
TRACHEA_Y, TRACHEA_R, BRONCHUS_R = -15.0, 9.0, 6.0


@dataclass
class SynthResult:
    out_dir: Path
    study_uid: str
    series_uid: str
    files: list[Path] = field(default_factory=list)
    truth: dict = field(default_factory=dict)
    truth_path: Path = Path()


def _lung_scale(u: float) -> float:
    """Lung cross-section scale along the scan: 0 outside, rounded apex, broad base."""
    if not LUNG_TOP < u < LUNG_BOTTOM:
        return 0.0
    t = (u - LUNG_TOP) / (LUNG_BOTTOM - LUNG_TOP)
    return float(np.sin(np.pi * t) ** 0.5 * (0.75 + 0.25 * t))


def _nodules(rng: np.random.Generator, z_top: float, length: float) -> list[dict]:
    out = []
    for i, side in enumerate(["left", "right", "left"]):
        u = 0.35 + 0.15 * i + rng.uniform(-0.03, 0.03)
        s = _lung_scale(u)
        sign = 1 if side == "left" else -1
        cx = sign * (LUNG_X + rng.uniform(-0.3, 0.3) * LUNG_AX * s)
        cy = LUNG_Y + rng.uniform(-0.3, 0.3) * LUNG_AY * s
        out.append({"center_mm": [round(cx, 2), round(cy, 2), round(z_top - u * length, 2)],
                    "diameter_mm": round(float(rng.uniform(4.0, 12.0)), 2), "side": side})
    return out


def _template(study_uid: str, series_uid: str, for_uid: str, *, rows: int, cols: int, pixel_spacing: float,
              slice_thickness: float, patient_id: str, patient_name: str, body_part: str,
              series_description: str, transfer_syntax: UID) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    today = date(2026, 1, 15).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    # hashlib, not hash(): str hashes are salted per process and the series must be reproducible.
    ds.AccessionNumber = f"ACC{int(hashlib.sha256(study_uid.encode()).hexdigest(), 16) % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "AINODE-SYNTH"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = "Referrer^Synthetic"
    ds.StationName = "SYNTHCT1"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "ainode synth"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.SpacingBetweenSlices = f"{slice_thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed, as most CT scanners store
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_chest_ct(
    out_dir: Path,
    *,
    slices: int = 120,
    slice_thickness: float = 2.5,
    rows: int = 512,
    cols: int = 512,
    pixel_spacing: float = 0.7,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str = "SYNTH0001",
    patient_name: str = "Synthetic^Chest",
    study_uid: str | None = None,
    body_part: str = "CHEST",
    series_description: str = "Synthetic chest CT",
    on_slice: Callable[[], None] | None = None,
) -> SynthResult:
    """Write one CT series (one Part-10 file per slice) and `truth.json` into `out_dir`.

    `on_slice` is called after each file is written (the CLI's progress bar).
    """
    ts = UID(SUPPORTED_SYNTAXES.get(transfer_syntax, transfer_syntax))
    if ts not in SUPPORTED_SYNTAXES.values():
        raise ValueError(f"transfer syntax {transfer_syntax!r} is not supported; "
                         f"choose one of {', '.join(SUPPORTED_SYNTAXES)}")
    if slices < 10:
        raise ValueError("slices must be at least 10")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid(entropy_srcs=["ainode-synth", "study", str(seed), patient_id])
    params = [study_uid, str(slices), str(slice_thickness), str(rows), str(cols), str(pixel_spacing), str(seed)]
    series_uid = generate_uid(entropy_srcs=["series", *params])
    for_uid = generate_uid(entropy_srcs=["frame-of-reference", *params])

    length = slices * slice_thickness
    z_top = 0.0
    x0 = -(cols - 1) / 2 * pixel_spacing
    y0 = -(rows - 1) / 2 * pixel_spacing
    x = (x0 + np.arange(cols, dtype=np.float32) * pixel_spacing)[None, :]
    y = (y0 + np.arange(rows, dtype=np.float32) * pixel_spacing)[:, None]
    nodules = _nodules(rng, z_top, length)
    # Vessels: soft-tissue tubes running along the scan inside each lung, at fixed fractions of the
    # lung's semi-axes, so they follow the lung as it widens and narrows. Holes a segmentation must fill.
    vessels = [(side, float(a), float(b), float(r)) for side in ("left", "right")
               for a, b, r in zip(rng.uniform(-0.55, 0.55, 5), rng.uniform(-0.6, 0.6, 5), rng.uniform(1.2, 3.0, 5))]

    # In-plane fields that do not change along the scan.
    body = (x / BODY_A) ** 2 + (y / BODY_B) ** 2 <= 1.0
    inner = (x / (BODY_A - FAT_MM)) ** 2 + (y / (BODY_B - FAT_MM)) ** 2 <= 1.0
    rib_r = np.sqrt((x / RIB_A) ** 2 + (y / RIB_B) ** 2)
    theta = np.arctan2(y, x)
    ribs_ring = (np.abs(rib_r - 1.0) * min(RIB_A, RIB_B) <= RIB_HALF_WIDTH) & (y < SPINE_Y)
    spine = (x ** 2 + (y - SPINE_Y) ** 2) <= SPINE_R ** 2
    base = np.where(body, np.where(inner, 40.0, -100.0), -1000.0).astype(np.float32)
    base[spine] = 650.0

    tmpl = _template(study_uid, series_uid, for_uid, rows=rows, cols=cols, pixel_spacing=pixel_spacing,
                     slice_thickness=slice_thickness, patient_id=patient_id, patient_name=patient_name,
                     body_part=body_part, series_description=series_description, transfer_syntax=ts)

    counts = {"left": 0, "right": 0}
    files = []
    for k in range(slices):
        u = (k + 0.5) / slices
        z = z_top - k * slice_thickness
        hu = base.copy()
        # Ribs come and go along z, as rib segments do.
        rib_on = np.cos(10 * theta + 0.9 * np.sin(2 * np.pi * u * 6)) > 0.1
        hu[ribs_ring & rib_on] = 700.0
        s = _lung_scale(u)
        lung_masks = {}
        for side, sign in (("left", 1.0), ("right", -1.0)):
            if s <= 0:
                lung_masks[side] = np.zeros_like(body)
                continue
            m = ((x - sign * LUNG_X) / (LUNG_AX * s)) ** 2 + ((y - LUNG_Y) / (LUNG_AY * s)) ** 2 <= 1.0
            # A heart-shaped notch in the lower left lung keeps the shapes from being plain ellipses.
            if side == "left" and u > 0.55:
                m &= ((x - 30.0) ** 2 + (y + 20.0) ** 2) > (45.0 * (u - 0.45)) ** 2 * 4
            lung_masks[side] = m
        lung_any = lung_masks["left"] | lung_masks["right"]
        noise = rng.normal(0.0, 18.0, size=hu.shape).astype(np.float32)
        hu = np.where(lung_any, np.clip(-850.0 + noise, -935.0, -700.0), hu + np.where(body, noise * 0.6, 0))
        # Airways: trachea above the carina; two main bronchi running down and out to the lungs.
        if u <= CARINA:
            air = (x ** 2 + (y - TRACHEA_Y) ** 2) <= TRACHEA_R ** 2
            hu[air & ~lung_any] = -1000.0 + rng.normal(0, 3, size=int((air & ~lung_any).sum()))
        elif u <= CARINA + 0.12 and s > 0:
            t = (u - CARINA) / 0.12
            for sign in (1.0, -1.0):
                bx = sign * (t * (LUNG_X - LUNG_AX * s + 8.0))
                air = ((x - bx) ** 2 + (y - TRACHEA_Y) ** 2) <= BRONCHUS_R ** 2
                hu[air & ~lung_any] = -1000.0
        # Vessels, drawn only where the whole cross-section lies inside the lung: enclosed, still lung.
        if s > 0.3:
            for side, a, b, r in vessels:
                sign = 1.0 if side == "left" else -1.0
                vx, vy = sign * (LUNG_X + a * LUNG_AX * s), LUNG_Y + b * LUNG_AY * s
                ves = (x - vx) ** 2 + (y - vy) ** 2 <= r * r
                if not (ves & ~lung_masks[side]).any():
                    hu[ves] = 40.0 + noise[ves] * 0.6
        # Nodules: soft tissue inside the lungs, still lung for the volume truth.
        for n in nodules:
            cx, cy, cz = n["center_mm"]
            r2 = (n["diameter_mm"] / 2) ** 2 - (z - cz) ** 2
            if r2 > 0:
                nod = ((x - cx) ** 2 + (y - cy) ** 2 <= r2) & lung_masks[n["side"]]
                hu[nod] = 30.0
        counts["left"] += int(lung_masks["left"].sum())
        counts["right"] += int(lung_masks["right"].sum())

        stored = np.clip(np.rint(hu - INTERCEPT), -32768, 32767).astype(np.int16)
        sop_uid = generate_uid(entropy_srcs=[series_uid, "sop", str(k)])
        tmpl.file_meta.MediaStorageSOPInstanceUID = sop_uid
        tmpl.SOPInstanceUID = sop_uid
        tmpl.InstanceNumber = k + 1
        tmpl.ImagePositionPatient = [f"{x0:.3f}", f"{y0:.3f}", f"{z:.3f}"]
        tmpl.SliceLocation = f"{z:.3f}"
        path = out_dir / f"CT{k + 1:06d}.dcm"
        _save(tmpl, stored, ts, path)
        files.append(path)
        if on_slice is not None:
            on_slice()

    voxel_ml = pixel_spacing * pixel_spacing * slice_thickness / 1000.0
    truth = {
        "left_lung_ml": round(counts["left"] * voxel_ml, 3),
        "right_lung_ml": round(counts["right"] * voxel_ml, 3),
        "total_lung_ml": round((counts["left"] + counts["right"]) * voxel_ml, 3),
        "slices": slices,
        "slice_thickness_mm": slice_thickness,
        "pixel_spacing_mm": pixel_spacing,
        "rows": rows,
        "columns": cols,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "transfer_syntax": str(ts),
        "seed": seed,
        "nodules": nodules,
    }
    truth_path = out_dir / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=2))
    return SynthResult(out_dir, study_uid, series_uid, files, truth, truth_path)


def _save(ds: Dataset, stored: np.ndarray, ts: UID, path: Path) -> None:
    ds.file_meta.TransferSyntaxUID = ts
    if ts in COMPRESSED:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        ds.compress(ts, stored, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        # Back to native for the next slice.
        ds.file_meta.TransferSyntaxUID = ts
        return
    if ts == ExplicitVRBigEndian:
        ds.PixelData = stored.astype(">i2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
        return
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
