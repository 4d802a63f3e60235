"""edgeflow: FlowNet2 optical flow, compressed and compiled with TVM for Jetson and CPUs.

Public API (heavy dependencies are imported on first use):
    edgeflow.read_flow(path) / write_flow(path, flow)   .flo, KITTI .png, .npy by suffix
    edgeflow.flow_to_color(flow) -> uint8 HxWx3          Middlebury colour wheel
    edgeflow.epe(pred, gt, valid=None) -> float          mean end-point error
    edgeflow.models.create(name, weights=...)            FlowNet2 family (torch)
    edgeflow.compile.compile(model, target=..., ...)     TVM package
    edgeflow.runtime.load(path) -> Engine                on-device runtime
"""

__version__ = "0.1.0"

from edgeflow.flow_io import read_flow, write_flow  # noqa: E402
from edgeflow.metrics import epe, fl_all  # noqa: E402
from edgeflow.visualize import flow_to_color  # noqa: E402

__all__ = ["__version__", "read_flow", "write_flow", "flow_to_color", "epe", "fl_all"]
