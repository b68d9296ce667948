"""``python -m sbora_reg.cli``: the same as the ``sbora-reg`` script."""

from sbora_reg.cli import main

main(prog_name="sbora-reg")
