"""Why an instance is not de-identified (and so not sent). Messages carry tags and UIDs, never names or IDs."""


class DeidentificationError(ValueError):
    """The instance cannot be de-identified safely; it must not leave the node."""


class BurnedInAnnotationError(DeidentificationError):
    """Identity may be burned into the pixels, and the Clean Pixel Data Option is not implemented."""
