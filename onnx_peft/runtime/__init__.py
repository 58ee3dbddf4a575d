"""AdapterSession: one ONNX Runtime session, many adapters, swapped per run or mixed per row.

A model with adapter slots (optional inputs ``<module>.lora_A.weight`` = A^T ``[in, r]`` and
``<module>.lora_B.weight`` = (s B)^T ``[r, out]`` with zero-rank defaults) runs as the base when
no slot is fed. Loading an adapter checks it against the model's contract and turns its tensors
into OrtValues on the session's device once; ``run(..., adapter="name")`` then feeds those
OrtValues, so switching adapters copies nothing.

On a model built by the MultiAdapter pass the slots are replaced by banks
``A [N, in, r_max]``, ``B [N, r_max, out]`` and an ``adapter_ids [batch]`` input (0 = no
adapter). Full-weight slots (a ``modules_to_save`` head, ``<module>.weight`` / ``.bias``) become
banks ``<module>.weight.bank [N, in, out]`` / ``<module>.bias.bank [N, out]`` whose row 0, and the
row of every adapter without that head, holds the base tensors (read once from the model file).
The session builds the banks from the loaded adapters (again once per load/unload,
as immutable snapshots) and ``run(..., adapter=["a", None, "b"])`` feeds one id per row.

Thread safety: ``run`` takes a reference on each adapter it uses; ``unload_adapter`` refuses new
runs of that adapter, waits for the ones in flight (or fails after ``timeout``), then drops it.
Bank snapshots are never changed in place, so a run always sees the banks and ids it started
with: never another adapter's output.

This module needs only numpy and onnxruntime (no torch).
"""

from ..graph.banks import MULTI_ADAPTER_KEY, BankEntry, MultiLayout, stack_bank  # noqa: F401  (public here too)
from .generation import _sample, example_feeds  # noqa: F401
from .session import AdapterSession  # noqa: F401
