"""`ainode synth`: synthetic studies with known truth, for tests, demos and benchmarks."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from node.synth.chest_ct import SUPPORTED_SYNTAXES, SynthResult, write_chest_ct

__all__ = ["SynthResult", "main", "write_chest_ct"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ainode synth", description="Write a synthetic chest CT series and truth.json")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--thickness", type=float, default=2.5, help="slice thickness and spacing in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transfer-syntax", default="ExplicitVRLittleEndian", choices=sorted(SUPPORTED_SYNTAXES))
    p.add_argument("--patient-id", default="SYNTH0001")
    p.add_argument("--study-uid", default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    from node.progress import progress

    with progress("synth", a.slices) as advance:
        r = write_chest_ct(a.out, slices=a.slices, slice_thickness=a.thickness, seed=a.seed,
                           transfer_syntax=a.transfer_syntax, patient_id=a.patient_id, study_uid=a.study_uid,
                           on_slice=advance)
    print(f"wrote {len(r.files)} CT slices to {r.out_dir} in {time.perf_counter() - t0:.1f}s: "
          f"left lung {r.truth['left_lung_ml']:.1f} mL, right lung {r.truth['right_lung_ml']:.1f} mL "
          f"(truth: {r.truth_path})")
    return 0
