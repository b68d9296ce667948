"""sbora-reg: SBoRA adapters and a registry that composes them as modules of one model."""

from sbora_reg.errors import SboraRegError

__version__ = "0.1.0"
__all__ = ["SboraRegError", "__version__"]
