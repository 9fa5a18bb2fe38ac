"""ct_nodule: lung nodule segmentation and measurement with the bundled demonstration 3-D U-Net."""

from plugins.ct_nodule.plugin import CtNodulePlugin

__all__ = ["CtNodulePlugin"]
