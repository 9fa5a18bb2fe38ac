from node.dispatch.cstore import Outgoing, SendError, send_files
from node.dispatch.dispatcher import Dispatcher

__all__ = ["Dispatcher", "Outgoing", "SendError", "send_files"]
