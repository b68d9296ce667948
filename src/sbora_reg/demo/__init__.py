"""The end-to-end demo (`sbora-reg demo`): a real small base, skills, registry, compose.

It sits above the registry and the method and uses only their public functions: the base
preparation (``base``), the procedural skills (``skills``) and the run itself (``run``).
"""

from sbora_reg.demo.run import DemoConfig, DemoReport, quick, run_demo

__all__ = ["DemoConfig", "DemoReport", "quick", "run_demo"]
