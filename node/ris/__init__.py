"""Results to the hospital's RIS: HL7 v2.5 ORU^R01 over MLLP (optionally TLS), and FHIR R4 over HTTP(S).

Both read the result SR the node built, so the RIS gets the same values and UIDs as the PACS. Each call
is one attempt; the dispatcher retries by `RisSendError.retryable` with the destination's backoff.
"""

from .config import FhirDestination, MllpTls, RisDestination
from .errors import RisSendError
from .fhir import build_bundle, send_fhir
from .oru import build_oru, send_oru
from .report import Report, read_report

__all__ = ["FhirDestination", "MllpTls", "RisDestination", "RisSendError", "Report", "build_bundle",
           "build_oru", "read_report", "send_fhir", "send_oru"]
