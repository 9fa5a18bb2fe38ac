from plugins.ct_lung.plugin import CtLungPlugin

__all__ = ["CtLungPlugin"]
