"""CLI verbs: push, pull (adapters and compose outputs to and from the Hugging Face Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import echo_json, open_registry

if TYPE_CHECKING:
    from sbora_reg.registry.hub import PushResult

_endpoint = click.option(
    "--endpoint", metavar="URL", help="Hub URL [default: HF_ENDPOINT, else https://huggingface.co]."
)
_timeout = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each answer of the Hub.",
)


@main.command()
@click.argument("ref", required=False, metavar="NAME[@V]")
@click.option("--path", type=click.Path(file_okay=False, path_type=Path),
              help="Push this compose output as it is, instead of an adapter version.")  # fmt: skip
@click.option("--repo", required=True, metavar="OWNER/NAME", help="Model repo on the Hub.")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to [default: main].")
@_endpoint
@_timeout
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def push(
    ctx: click.Context,
    ref: str | None,
    path: Path | None,
    repo: str,
    private: bool,
    revision: str | None,
    endpoint: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Push NAME[@V] (native files, a PEFT view and a model card) to --repo in one commit.

    The token is huggingface_hub's own (HF_TOKEN or `hf auth login`); it is never printed or
    stored. Pushing unchanged content makes no commit.
    """
    from sbora_reg.registry import hub

    if (ref is None) == (path is None):
        raise click.UsageError("pass an adapter NAME[@V] or --path DIR, not both")
    hub.use_timeout(timeout)
    options: dict[str, Any] = {"private": private, "revision": revision, "endpoint": endpoint}
    with open_registry(ctx) as registry:
        if path is not None:
            result = hub.push_dir(registry, path, repo, **options)
        else:
            result = hub.push(registry, str(ref), repo, **options)
    if as_json:
        echo_json(result.to_json())
    else:
        _render_push(result)


def _render_push(result: PushResult) -> None:
    what = result.ref or "the directory"
    where = f"{result.repo}@{result.revision}"
    if result.changed:
        click.echo(f"pushed {what} to {where}: commit {result.commit}")
    else:
        click.echo(f"{where} already holds {what} (commit {result.commit}): no new commit")
    if result.composition_id is not None:
        click.echo(f"recorded on composition #{result.composition_id}")


@main.command()
@click.argument("repo_ref", metavar="OWNER/NAME[@REVISION]")
@click.option("--name", help="Register as NAME [default: the repo's name].")
@click.option("--base", help="Base model: registered base or local model directory "
              "[default: the registered base whose Hub id is the card's base_model].")  # fmt: skip
@_endpoint
@_timeout
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def pull(
    ctx: click.Context,
    repo_ref: str,
    name: str | None,
    base: str | None,
    endpoint: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Download an adapter repo (sbora-reg or plain PEFT LoRA), check every file, register it.

    Files go to the standard Hugging Face cache and are checked against the sha256 the Hub
    lists; a corrupted one is removed from the cache. Pulling the same commit again changes
    nothing.
    """
    from sbora_reg.registry import hub

    hub.use_timeout(timeout)
    with open_registry(ctx) as registry:
        result = hub.pull(registry, repo_ref, name=name, base=base, endpoint=endpoint)
    if as_json:
        echo_json(result.to_json())
    elif result.new:
        click.echo(f"pulled {result.repo}@{result.commit[:12]} as {result.record.ref}")
    else:
        click.echo(f"{result.repo}@{result.commit[:12]} is already {result.record.ref}")
