"""fxlora's command-line interface and benchmarks (installed as ``fxlora.tools``)."""
