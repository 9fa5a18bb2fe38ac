from node.audit.log import AuditLog
from node.audit.verify import VerifyResult, verify_log

__all__ = ["AuditLog", "VerifyResult", "verify_log"]
