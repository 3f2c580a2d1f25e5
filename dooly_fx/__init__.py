"""dooly_fx: LLM serving latency from symbolic FX captures and per-op profiles.

The front end: `dooly_fx.report.analyze_model` (one model) and `dooly_fx.report.analyze_graph`
(any symbolic GraphModule). Command line: `python -m dooly_fx --help`.
"""

__version__ = "0.1.0"
