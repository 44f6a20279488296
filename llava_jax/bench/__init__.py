"""`llava-jax bench`: time llava-jax against transformers (PyTorch) on the same checkpoint and inputs.

One command run measures, for a LLaVA-NeXT prompt with one image:
- time to first token (host preprocessing + vision tower + prefill + first sample), cold (first call,
  compiling) and warm (best of the repeats);
- decode tokens/s (greedy, always exactly `--new-tokens` tokens: stop tokens are ignored);
- compile time and the compiled programs (from `jax.monitoring` events), persistent-cache hits;
- peak RSS: every side runs in its own subprocess, so each peak is that side's alone;
- the decode floor of this machine: bytes of text weights read per token / the memory read bandwidth of an
  XLA fp32 matrix-vector product, and the percentage of it that decode reaches;
- with `--compare-torch`, the same figures for transformers' `LlavaNextForConditionalGeneration` (same
  checkpoint, same image and prompt, greedy, forced to the same number of new tokens) and the ratios.

`llava-jax bench --load-only` times only loading (`llava_jax.load` against `from_pretrained`), each side several
times in fresh processes: the median, its CPU time and the peak RSS while loading.

`llava-jax bench --make-checkpoint DIR --shape tinyllava` writes the benchmark's checkpoint without a hub.

The modules, one concern each:
    checkpoints.py  the benchmark shapes and `make_checkpoint`
    inputs.py       the prompt and the image, the same on both sides
    measure.py      RSS, the compile-event log, summarizing runs, the decode floor (bandwidth probe)
    jax_side.py     the llava-jax side: timed runs through the library's one pipeline
    torch_side.py   the transformers side
    child.py        running a side in its own process
    report.py       the printed report
    cli.py          the `bench` arguments and command

Only light modules load with this package (no jax, no model code): the PyTorch side imports it too.
"""

from .checkpoints import SHAPES, checkpoint_config, make_checkpoint
from .cli import add_bench_parser, cmd_bench, run_bench
from .report import print_report

__all__ = ["SHAPES", "add_bench_parser", "checkpoint_config", "cmd_bench", "make_checkpoint", "print_report",
           "run_bench"]
