from node.audit.atna import AtnaMapper
from node.audit.atna_config import AtnaSection
from node.audit.forward import AtnaConfigError, AtnaForwarder, build_atna_forwarder
from node.audit.log import AuditLog
from node.audit.syslog import SyslogForwarder
from node.audit.verify import VerifyResult, verify_log

__all__ = ["AtnaConfigError", "AtnaForwarder", "AtnaMapper", "AtnaSection", "AuditLog", "SyslogForwarder",
           "VerifyResult", "build_atna_forwarder", "verify_log"]
