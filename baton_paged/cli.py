"""The ``baton-paged`` command. Subcommands import torch and transformers only when they run."""

from __future__ import annotations

import click

ARCH_CHOICES = ("llama", "qwen2", "gpt2")
SIZE_CHOICES = ("tiny", "small")


@click.group()
@click.version_option(package_name="baton-paged")
def main() -> None:
    """baton-paged: BATON dynamic re-batching on a paged KV cache."""


@main.command("make-model")
@click.argument("out_dir", type=click.Path(file_okay=False, writable=True))
@click.option(
    "--arch",
    type=click.Choice(ARCH_CHOICES),
    default="llama",
    show_default=True,
    help="HF architecture of the checkpoint.",
)
@click.option(
    "--size",
    type=click.Choice(SIZE_CHOICES),
    default="small",
    show_default=True,
    help="tiny: 2 layers for tests; small: ~28M parameters (Llama: hidden 512, 8 layers, "
    "8 heads, 4 KV heads, vocab 4096).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def make_model(out_dir: str, arch: str, size: str, seed: int) -> None:
    """Write a random-weight HF checkpoint with a locally trained byte-level BPE tokenizer.

    Nothing is downloaded; the same arguments give the same files. The weights are random, so the
    model's text is noise: it exists to exercise and measure the engine.
    """
    from baton_paged.model_builder import build_model

    path = build_model(out_dir, arch=arch, size=size, seed=seed)
    click.echo(f"wrote a random-weight {arch} ({size}) checkpoint to {path}")
