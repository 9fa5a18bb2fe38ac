from node.receive.scp import STORAGE_CLASSES, TRANSFER_SYNTAXES, StoreSCP
from node.receive.spool import Spool

__all__ = ["STORAGE_CLASSES", "TRANSFER_SYNTAXES", "Spool", "StoreSCP"]
