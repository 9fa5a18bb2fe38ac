from node.assemble.quiet import QUIET_PERIOD, Assembler

__all__ = ["QUIET_PERIOD", "Assembler"]
