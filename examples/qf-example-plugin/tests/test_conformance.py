"""The contracts every quantizer keeps, checked by the core's conformance kit (both tutorials
show these two classes): a run on a tiny model of every built-in dense architecture and two MoEs, every planned
tensor on its format, the artifact reloading to the in-memory model."""

from quantfoundry.testing.conformance import QuantizerConformance


class TestMSERTN(QuantizerConformance):
    quantizer = "mse-rtn"


class TestOutputClip(QuantizerConformance):
    quantizer = "output-clip"
