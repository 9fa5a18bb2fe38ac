"""Model packages: locked, hash-verified weights with a manifest (models/<name>/<version>/)."""

from node.models.package import LoadedModel, Manifest, ModelError, load_model, package_digest

__all__ = ["LoadedModel", "Manifest", "ModelError", "load_model", "package_digest"]
