"""The `departments:` section: which department a study is billed to, for `ainode report usage`."""

from __future__ import annotations

from pydantic import Field, field_validator

from node.config.base import Strict

UNASSIGNED = "unassigned"


class DepartmentsSection(Strict):
    """Department of a study: its InstitutionalDepartmentName (0008,1040) mapped by
    `by_institutional_department` if listed there, else its sender mapped by `by_calling_ae`, else 'unassigned'.

    The header name wins because one modality (one calling AE) often serves several departments.
    """

    by_calling_ae: dict[str, str] = Field(default_factory=dict, description="Calling AE title → department.")
    by_institutional_department: dict[str, str] = Field(
        default_factory=dict, description="InstitutionalDepartmentName as sent (case-insensitive) → department.")

    @field_validator("by_calling_ae", "by_institutional_department")
    @classmethod
    def _no_blank(cls, mapping: dict[str, str]) -> dict[str, str]:
        for key, dept in mapping.items():
            if not key.strip() or not dept.strip():
                raise ValueError(f"blank name or department in {key!r}: {dept!r}")
        return mapping

    def department(self, calling_ae: str | None, institutional_department: str | None) -> str:
        """The department a study counts for (see the class docstring for the order)."""
        if institutional_department:
            wanted = institutional_department.strip().upper()
            for name, dept in self.by_institutional_department.items():
                if name.strip().upper() == wanted:
                    return dept
        if calling_ae:
            wanted = calling_ae.strip().upper()
            for ae, dept in self.by_calling_ae.items():
                if ae.strip().upper() == wanted:
                    return dept
        return UNASSIGNED
