"""Turns a verified model package into a callable network on a device: TorchScript or ONNX.

The weights are read once into memory, their sha256 is checked again on exactly those bytes, and the
network is built from the bytes, so a file swapped between the package check and the load cannot run.
Both formats take and return torch tensors, so a plugin's code is the same for either.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Callable

from node.models.package import LoadedModel, ModelError

Network = Callable[[Any], Any]  # torch.Tensor -> torch.Tensor


def _verified_bytes(model: LoadedModel, index: int) -> bytes:
    entry = model.manifest.weights[index]
    path = model.path / entry.file
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ModelError(f"{path}: sha256 changed after the package was verified; the file is being replaced "
                         "while the node loads it. Restore the package and restart the node.")
    return data


class OnnxNetwork:
    """An onnxruntime session that takes and returns torch tensors (first input, first output)."""

    def __init__(self, data: bytes, device: str, source: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"{source}: the package's format is onnx, but onnxruntime is not installed "
                             "(pip install onnxruntime, or onnxruntime-gpu for CUDA)") from exc
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        import torch

        options = ort.SessionOptions()
        # onnxruntime starts one thread per core, ignoring OMP_NUM_THREADS: the worker's share, as torch has
        # it (node.cpus.worker_thread_env).
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.device = device

    def __call__(self, x: Any) -> Any:
        import torch

        out = self.session.run(None, {self.input: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    def eval(self) -> "OnnxNetwork":  # the same call as a torch module's, for plugins that call it
        return self


def load_network(model: LoadedModel, device: str = "cpu", index: int = 0) -> Network:
    """The package's weight file `index` as a network on `device`, in the format its manifest names."""
    data = _verified_bytes(model, index)
    source = str(model.path / model.manifest.weights[index].file)
    if model.manifest.format == "onnx":
        return OnnxNetwork(data, device, source)
    import torch

    try:
        return torch.jit.load(io.BytesIO(data), map_location=device).eval()
    except RuntimeError as exc:
        raise ModelError(f"{source}: not a TorchScript file the installed torch can load ({exc}); "
                         "check the manifest's format") from exc
