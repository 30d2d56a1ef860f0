"""The seams between the package's parts, read from the source: who may touch what.

- KV rows: only ivl_fast/models/ reads or writes an engine's cache (the decode core uses the KV-row API).
- Continuous batches: ivl_fast/serve/ talks to the ContinuousBatch contract only, never to the buffers' layout.
- The sampling kernel: launched by keyword from its one argument table (tests/test_combine_and_sample.py checks
  the table against the signature); the op hands its inputs over as one list in that table's order.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ivl_fast"


def _lines(folder: str | None = None, skip=()):
    root = PACKAGE if folder is None else PACKAGE / folder
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in skip:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            yield f"{rel}:{n}", line.split("#")[0]


def test_no_module_outside_the_models_reaches_into_a_cache():
    """Who owns a KV row is explicit: outside ivl_fast/models/ no module reads or writes an engine's cache object
    (``.kv``), its positions (``.seq_lens``) or its K/V buffers."""
    pattern = re.compile(r"\.(kv|seq_lens|k_cache|v_cache)\b")
    found = [f"{where}: {line.strip()}" for where, line in _lines(skip=("models", "kernels")) if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_server_knows_no_buffer_layout():
    """serve/ reads what is new through ContinuousBatch.read_new: no buffers, no output columns, no device reads
    of the batch's state."""
    pattern = re.compile(r"\bbufs\b|DecodeBuffers|\.top_ids|\.stop_step|\.finished\[|batch\.(out|logprobs|steps)\b")
    found = [f"{where}: {line.strip()}" for where, line in _lines("serve") if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_sampling_kernel_is_reached_through_its_argument_table():
    """No positional launch of the kernel and no positional list of its arguments outside kernels/: the op takes
    (inputs, v_out, alpha, workspace), and the only caller builds the inputs by name."""
    op = (PACKAGE / "ops" / "combine_and_sample.py").read_text()
    assert "_triton_op([x.get(n) for n in kernel.INPUTS]" in op
    kernel = (PACKAGE / "kernels" / "combine_and_sample.py").read_text()
    assert "_combine_sample_kernel[grid](**args, **flags" in kernel
    assert kernel.count("frequency_penalty_ptr") == 3  # the signature, the table, the one load in the kernel
