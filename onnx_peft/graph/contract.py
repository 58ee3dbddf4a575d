"""Slot naming and the compatibility contract between a model and its adapter files.

A model with adapter slots records a JSON contract in its ``metadata_props`` under
``CONTRACT_KEY``; every adapter file records the base ``fingerprint``. :func:`check_adapter`
compares an adapter's tensors against the contract and raises
:class:`IncompatibleAdapterError` at the first mismatch, so a bad adapter never reaches
onnxruntime's "Invalid input name".

Slot layout (MatMul-ready, as ``olive convert-adapters`` writes it)::

    <module>.lora_A.weight   A^T        [in, r]      r symbolic ("lora_r")
    <module>.lora_B.weight   (s * B)^T  [r, out]     scale folded in

A ``modules_to_save`` Linear (a classification head trained in full) gets full-weight slots of
fixed shape whose defaults are the base model's own tensors, so no feed = the base::

    <module>.weight   W in the layout the graph's MatMul/Gemm consumes: layout "in_out" [in, out]
                      or "out_in" [out, in] (recorded in ``Slot.layout``)
    <module>.bias     [out]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import IncompatibleAdapterError, ModelFileError

CONTRACT_KEY = "onnx_peft.contract"
FINGERPRINT_KEY = "onnx_peft.fingerprint"
PEFT_PREFIX = "base_model.model."
FULL_WEIGHT_METHOD = "modules_to_save"
RANK_DIM = "lora_r"
CONTRACT_VERSION = 1


def slot_name(module_path: str, tensor: str) -> str:
    """``slot_name("model.layers.0.self_attn.q_proj", "lora_A.weight")``; PEFT key minus prefix."""
    return f"{module_path}.{tensor}"


def rank_dim(module_path: str) -> str:
    """The symbolic rank dim of one module's slots: ``lora_r.<module>``.

    One dim per module, not one shared ``lora_r``: ONNX Runtime plans buffers assuming equal
    dim_params are equal, and crashes ("Shape mismatch attempting to re-use buffer") as soon as
    two modules get different ranks in one run (rank_pattern, or an adapter that leaves some
    slots at their zero-rank default).
    """
    return f"{RANK_DIM}.{module_path}"


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.model.layers.0...`` -> ``model.layers.0...``."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


@dataclass(frozen=True)
class Slot:
    """One adapter tensor the model accepts. ``shape`` holds ints and symbolic dim names.

    ``method``: the branch form the slot belongs to (methods/forms.py: ``lora``, ``dora``,
    ``ia3_out``, ...) or ``modules_to_save``. ``layout``: how a full-weight weight slot is
    oriented, ``"in_out"`` or ``"out_in"``; ``""`` otherwise. ``default``: the no-op value
    (``zeros`` with symbolic dims at 0, ``ones``, ``identity``, ``minus_one`` for token ids;
    ``base`` for full weights). ``tied_to``: for the ``tokens`` slots of an output head that shares
    an embedding's weight, that embedding's module (an adapter training only the embedding's rows
    fills the head's slots with the same tensors, as PEFT ties them).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    module: str
    method: str = "lora"
    layout: str = ""
    default: str = ""
    tied_to: str = ""  # a head tied to this embedding module: an adapter without rows of its own mirrors its

    @property
    def default_kind(self) -> str:
        """``default``, or what contracts written before it was recorded meant."""
        if self.default:
            return self.default
        if self.method == FULL_WEIGHT_METHOD:
            return "base"
        return "ones" if self.name.endswith(".dora_factor") else "zeros"

    def fits(self, shape: Iterable[int]) -> bool:
        shape = tuple(shape)
        return len(shape) == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, shape)
        )


@dataclass
class Contract:
    """Which slots a model has and which base weights it was built on.

    ``external``: the slots are overridable initializers holding the exported adapter (``export
    --mode external``, ``extract --external``): a raw ONNX Runtime run without slot feeds applies
    that adapter, not the base. The no-op is still each slot's ``default`` (rank 0), which
    AdapterSession feeds for every slot an adapter leaves out, and for all of them when no
    adapter is chosen, so there too no adapter = the base.
    """

    slots: list[Slot] = field(default_factory=list)
    fingerprint: str = ""
    version: int = CONTRACT_VERSION
    external: bool = False

    def slot_map(self) -> dict[str, Slot]:
        return {slot.name: slot for slot in self.slots}

    def to_json(self) -> str:
        data = {"version": self.version, "fingerprint": self.fingerprint,
                "slots": [_slot_json(s) for s in self.slots]}
        if self.external:
            data["external"] = True
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> Contract:
        """Parse a contract; anything malformed is a ModelFileError naming ``source`` and the key."""
        data = parse_metadata_json(text, CONTRACT_KEY, source)
        where = f"{source}: metadata {CONTRACT_KEY!r}"
        slots_data = data.get("slots", [])
        if not isinstance(slots_data, list):
            raise ModelFileError(f"{where}: 'slots' must be a list; the model file is corrupt, export it again")
        known = {f.name for f in fields(Slot)}  # fields of a newer writer are ignored
        slots = []
        for index, entry in enumerate(slots_data):
            if not isinstance(entry, dict):
                raise ModelFileError(f"{where}: slots[{index}] must be an object; the model file is corrupt")
            values = {k: v for k, v in entry.items() if k in known}
            for key in ("name", "dtype", "module"):
                if not isinstance(values.get(key), str):
                    raise ModelFileError(f"{where}: slots[{index}].{key} must be a string, got {values.get(key)!r:.60}")
            for key in ("method", "layout", "default", "tied_to"):
                if not isinstance(values.get(key, ""), str):
                    raise ModelFileError(f"{where}: slots[{index}].{key} must be a string, got {values[key]!r:.60}")
            values["shape"] = metadata_shape(values.get("shape"), f"{where}: slots[{index}].shape")
            check_dtype_name(values["dtype"], f"{where}: slots[{index}].dtype")
            slots.append(Slot(**values))
        fingerprint, version = data.get("fingerprint", ""), data.get("version", CONTRACT_VERSION)
        if not isinstance(fingerprint, str) or isinstance(version, bool) or not isinstance(version, int):
            raise ModelFileError(f"{where}: 'fingerprint' must be a string and 'version' an integer")
        external = data.get("external", False)
        if not isinstance(external, bool):
            raise ModelFileError(f"{where}: 'external' must be true or false, got {external!r:.60}")
        return cls(slots=slots, fingerprint=fingerprint, version=version, external=external)


def parse_metadata_json(text: Any, key: str, source: str) -> dict[str, Any]:
    """A JSON object stored in a model's metadata_props, or ModelFileError naming the model and key."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"{source}: metadata {key!r} is not valid JSON ({type(exc).__name__}: "
                             f"{str(exc)[:120]}); the model file is corrupt, export it again") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{source}: metadata {key!r} must be a JSON object, got {type(data).__name__}; "
                             "the model file is corrupt, export it again")
    return data


def metadata_shape(value: Any, where: str) -> tuple[int | str, ...]:
    """A recorded shape: a list of non-negative ints and symbolic dim names."""
    if not isinstance(value, list) or not all(
            isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in value):
        raise ModelFileError(f"{where} must be a list of non-negative integers and dim names, got {value!r:.60}")
    return tuple(value)


def check_dtype_name(name: str, where: str) -> None:
    """``name`` is a numpy dtype name (``bfloat16`` through ml_dtypes)."""
    try:
        if name == "bfloat16":
            import ml_dtypes  # noqa: F401  registers the name with numpy
        np.dtype(name)
    except (TypeError, ImportError):
        raise ModelFileError(f"{where}: {name[:40]!r} is not a dtype; the model file is corrupt") from None


def _slot_json(slot: Slot) -> dict[str, Any]:
    """A slot as JSON; an empty ``layout``/``default``/``tied_to`` is left out."""
    data = {**asdict(slot), "shape": list(slot.shape)}
    for key in ("layout", "default", "tied_to"):
        if not data[key]:
            del data[key]
    return data


def read_contract(metadata_props: Mapping[str, str], source: str = "model") -> Contract | None:
    """The contract stored in a model's metadata_props, or None if it has none.

    A corrupt one raises ModelFileError naming ``source`` (pass the model path) and the key."""
    text = metadata_props.get(CONTRACT_KEY)
    return Contract.from_json(text, source) if text else None


def write_contract(metadata_props: dict[str, str], contract: Contract) -> None:
    metadata_props[CONTRACT_KEY] = contract.to_json()


_CORNER = 4


def weight_fingerprint(weights: Mapping[str, Any]) -> str:
    """A short hash of base weights, reading only a few values of each.

    ``weights`` maps module path -> array-like in ``[out, in]`` orientation (a memory-mapped
    ``ExternalTensor.numpy()`` is fine). Only two 4x4 corner blocks of each weight are read:
    whatever the storage layout, that touches a handful of pages, so fingerprinting a 13 GB
    model reads kilobytes, not gigabytes. The same weights give the same fingerprint whatever
    the graph layout (and whether stored in fp32 or fp16), as long as callers pass them in
    ``[out, in]`` orientation.
    """
    digest = hashlib.sha256()
    for module in sorted(weights):
        array = weights[module]
        shape = tuple(int(d) for d in array.shape)
        digest.update(f"{module}|{shape}|".encode())
        flat = array.reshape(shape[0], -1)
        for block in (flat[:_CORNER, :_CORNER], flat[-_CORNER:, -_CORNER:]):
            # rounded to fp16: the fp32 and fp16 exports of one base share a fingerprint
            digest.update(np.ascontiguousarray(np.asarray(block, dtype=np.float32).astype(np.float16)).tobytes())
    return digest.hexdigest()[:32]


def check_adapter(contract: Contract, tensors: Mapping[str, tuple[tuple[int, ...], str]],
                  fingerprint: str | None = None, source: str = "adapter") -> None:
    """Raise IncompatibleAdapterError at the first way ``tensors`` do not fit ``contract``.

    ``tensors`` maps slot name -> (shape, numpy dtype name). A missing fingerprint (a plain
    PEFT dir) skips the base-model check; a different one fails it.
    """
    slots = contract.slot_map()
    dtypes = {np.dtype(dtype).name for name, (_, dtype) in tensors.items() if name in slots}
    wanted = {np.dtype(s.dtype).name for s in contract.slots if s.name in tensors}
    if dtypes and wanted and dtypes.isdisjoint(wanted) and len(dtypes) == len(wanted) == 1:
        # a dtype mismatch changes the fingerprint too: say what is actually wrong
        raise IncompatibleAdapterError(
            f"{source} holds {dtypes.pop()} tensors and the model takes {wanted.pop()}; convert it for this model: "
            "onnx-peft convert-adapters --adapter ADAPTER --model MODEL.onnx -o OUT (or --dtype)")
    if fingerprint and contract.fingerprint and fingerprint != contract.fingerprint:
        model_print = contract.fingerprint
        if fingerprint.startswith("ort31:"):  # an .onnx_adapter keeps a 31-bit digest: compare like with like
            from ..formats import short_fingerprint

            model_print = f"ort31:{short_fingerprint(contract.fingerprint):08x}"
        raise IncompatibleAdapterError(
            f"{source} was made for another base model (fingerprint {fingerprint} != model's "
            f"{model_print}); convert the PEFT adapter again against this model"
        )
    for name in tensors:
        if name not in slots:
            raise IncompatibleAdapterError(
                f"{source}: tensor {name!r} matches no slot of the model "
                f"(the model has {len(slots)} slots, e.g. {next(iter(slots), 'none')!r})"
            )
    groups: dict[tuple[str, str], list[Slot]] = {}  # a form's slots at a module come together
    for slot in contract.slots:
        groups.setdefault((slot.module, slot.method), []).append(slot)
    for module, method in sorted({(slots[n].module, slots[n].method) for n in tensors}):
        for slot in groups[(module, method)]:
            if slot.name not in tensors:
                raise IncompatibleAdapterError(f"{source}: missing tensor {slot.name!r} for module {module}")
    ranks: dict[str, int] = {}
    for name, (shape, dtype) in tensors.items():
        slot = slots[name]
        if np.dtype(dtype).name != np.dtype(slot.dtype).name:
            raise IncompatibleAdapterError(
                f"{source}: tensor {name!r} has dtype {np.dtype(dtype).name}, the model expects {slot.dtype}; "
                "convert the adapter with the model's dtype"
            )
        if not slot.fits(shape):
            raise IncompatibleAdapterError(
                f"{source}: tensor {name!r} has shape {list(shape)}, the model expects {list(slot.shape)}"
            )
        for want, got in zip(slot.shape, shape):
            if isinstance(want, str):
                key = f"{slot.module}:{want}"
                if ranks.setdefault(key, got) != got:
                    raise IncompatibleAdapterError(
                        f"{source}: {name!r} has {want}={got} but another tensor of {slot.module} has {ranks[key]}"
                    )


def header_check(contract: Contract, source: str = "adapter", converting: bool = False
                 ) -> Callable[[Mapping[str, tuple[tuple[int, ...], str]]], None]:
    """A ``check`` for :func:`onnx_peft.formats.load_adapter_file`: :func:`check_adapter` on a file's
    header (names, shapes, dtypes) before its data is read, so a file claiming tensors the model has no
    room for is refused without inflating them. ``converting=True`` (convert-adapters casts float
    tensors to the slot dtype and integer ones to int64) compares shapes, and ints against int slots."""
    slots = contract.slot_map()

    def check(header: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        if converting:
            header = {name: (shape, "int64" if _kind(dtype) in "iu" else slots[name].dtype if name in slots else dtype)
                      for name, (shape, dtype) in header.items()}
        check_adapter(contract, header, None, source=source)

    return check


def _kind(dtype: str) -> str:
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "V"
