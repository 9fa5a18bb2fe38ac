from node.assemble.assembler import QUIET_PERIOD, Assembler

__all__ = ["QUIET_PERIOD", "Assembler"]
