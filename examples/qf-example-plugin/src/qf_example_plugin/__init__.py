"""qf-example-plugin: the finished plugins of the two tutorials.

* ``mse-rtn`` (docs/writing-a-plugin.md, :mod:`.mse_rtn`) — round to nearest after a per-group
  search of the clipping range that minimises the squared rounding error; tensor by tensor;
* ``output-clip`` (docs/writing-a-block-quantizer.md, :mod:`.output_clip`) — the same search
  scored by each linear's output error on calibration data; block by block, with the toolkit.

Both only talk to the Format interface, so they work on any format whose ``fit`` returns
per-group parameters."""

from quantfoundry import hookimpl

from .mse_rtn import MSERTN, MSERTNOptions
from .output_clip import OutputClip, OutputClipOptions

__all__ = ["MSERTN", "MSERTNOptions", "OutputClip", "OutputClipOptions"]


@hookimpl
def qf_register_quantizers(register):
    register(MSERTN)
    register(OutputClip)
