"""``NeuronPatch``: a reversible transfer of units — MLP neurons, attention heads, k/v groups — from a donor into a
target.

(Over 400 lines: one concept, the patch — extract, apply / revert bit-exact, and its file format with every check a
loaded file gets — kept together so that save and load stay symmetric.)

A patch holds, for each kind of unit (``cnt.arch.UNIT_KINDS``) and layer, the transferred unit indices, the donor's
slices of those units and the target's original slices, a per-unit amplitude ``γ`` (optional) and one global ``alpha``,
plus provenance. Applying it writes ``θ_T,i + α·γ_i·(θ_D,i − θ_T,i)`` into each chosen unit ``i`` (exactly ``θ_D,i``
where ``α·γ_i = 1``; without per-unit amplitudes ``γ_i = 1``: one global α is the special case); reverting writes the
originals back, bit for bit. ``apply`` refuses a model whose architecture fingerprint, dtype or current slices do not
match (a wrong model, or the patch already applied).

On disk (``save``/``load``, peft-like): a folder with ``patch.safetensors`` and ``patch.json`` (metadata, the tensors'
sha256 and a checksum over the metadata and that sha256 together), written atomically (``cnt.atomic.folder``: an
interrupted save leaves the previous patch whole). ``load`` repeats every check ``extract`` makes — indices in range,
amplitudes finite, slices finite and shaped as the fingerprint says — and validates each metadata field against the
tensors, so an edited or damaged file is refused naming the field. Files of format versions 1 (MLP neurons and one α)
and 2 (no metadata checksum) still load, with the same field checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import atomic
from .arch import UNIT_KINDS, ArchFingerprint, IncompatibleModelsError, check_compatible, total_params, units
from .arch import fingerprint as fingerprint_of

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ALPHA_MAX = 16.0  # the largest global amplification a patch may carry (searches use 1-4)
GAMMA_MAX = 16.0  # the largest per-unit amplitude

Selection = Mapping[str, Mapping[int, "Sequence[int] | torch.Tensor"]]  # kind -> layer -> unit indices


class PatchError(ValueError):
    """A patch cannot be built, loaded, applied or reverted; the message says why. Nothing was changed."""


def by_kind(indices) -> dict[str, dict]:
    """``{layer: idx}`` (MLP neurons, the old form) or ``{kind: {layer: idx}}`` -> ``{kind: {layer: idx}}``."""
    if not indices:
        return {}
    if all(isinstance(k, str) for k in indices):
        unknown = set(indices) - set(UNIT_KINDS)
        if unknown:
            raise PatchError(f"unknown unit kinds {sorted(unknown)}; kinds: {', '.join(UNIT_KINDS)}")
        return {k: dict(v) for k, v in indices.items()}
    return {"mlp": dict(indices)}


def check_alpha(alpha, where: str = "alpha") -> float:
    """A global amplification: a finite number in (0, ALPHA_MAX] (not a bool, not a string)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0 < alpha <= ALPHA_MAX:
        raise PatchError(f"{where} must be a finite number in (0, {ALPHA_MAX:g}], got {alpha!r}")
    return float(alpha)


def _n_units(fp: ArchFingerprint, kind: str, layer: int) -> int:
    if kind == "mlp":
        return fp.intermediate_sizes[layer]
    if fp.attention is None:
        raise PatchError(f"{fp.model_type}: the patch has {kind} units but no attention layout")
    return fp.attention[0 if kind == "head" else 1]


def _as_indices(kind: str, indices: Mapping, fp: ArchFingerprint, gamma: Mapping | None
                ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Sorted, validated indices per layer (and the per-unit amplitudes, permuted alongside)."""
    out, gam = {}, {}
    for layer, idx in indices.items():
        layer = int(layer)
        if not 0 <= layer < fp.n_layers:
            raise PatchError(f"{kind} layer {layer} out of range: the model has {fp.n_layers} layers")
        t = torch.as_tensor(idx).flatten()
        if t.is_floating_point() or t.dtype == torch.bool:
            raise PatchError(f"{kind} layer {layer}: unit indices must be integers, got {t.dtype}")
        t = t.to(torch.long)
        if t.numel() == 0:
            continue
        g = None
        if gamma is not None and layer in gamma:
            g = torch.as_tensor(gamma[layer], dtype=torch.float32).flatten()
            if g.shape != t.shape:
                raise PatchError(f"{kind} layer {layer}: {g.numel()} amplitudes for {t.numel()} units")
            if not torch.isfinite(g).all() or (g < 0).any() or (g > GAMMA_MAX).any():
                raise PatchError(f"{kind} layer {layer}: per-unit amplitudes (gamma) must be finite and in "
                                 f"[0, {GAMMA_MAX:g}]")
        order = torch.argsort(t)
        t = t[order]
        n = _n_units(fp, kind, layer)
        if t[0] < 0 or t[-1] >= n:
            raise PatchError(f"{kind} layer {layer}: unit indices must lie in [0, {n})")
        if (t[1:] == t[:-1]).any():
            raise PatchError(f"{kind} layer {layer}: duplicate unit indices")
        out[layer] = t
        if g is not None:
            gam[layer] = g[order]
    return dict(sorted(out.items())), gam


def _unit_shape(fp: ArchFingerprint, kind: str) -> tuple[int, ...] | None:
    """The trailing shape of one unit's weight slices (``None``: not known from the fingerprint alone)."""
    if kind == "mlp":
        return (fp.hidden_size,)
    return (fp.attention[2], fp.hidden_size) if fp.attention is not None else None


def _check_values(kind: str, layer: int, n: int, fp: ArchFingerprint, donor: dict, target: dict) -> None:
    """The slices of one layer's units: the same names and shapes on both sides, ``n`` units, the fingerprint's
    widths, one dtype, every value finite (a NaN original could never be restored: NaN != NaN)."""
    where = f"{kind} layer {layer}"
    if not donor or set(donor) != set(target):
        raise PatchError(f"{where}: donor slices {sorted(donor)} and target slices {sorted(target)} differ")
    width = _unit_shape(fp, kind)
    dtypes = set()
    for name in donor:
        for side, t in (("donor", donor[name]), ("target", target[name])):
            if t.dim() == 0 or t.shape[0] != n:
                raise PatchError(f"{where}: {side} slice {name!r} has shape {tuple(t.shape)}, expected {n} units first")
            if width is not None and not name.endswith("bias") and math.prod(t.shape[1:]) != math.prod(width):
                raise PatchError(f"{where}: {side} slice {name!r} has shape {tuple(t.shape)}, the fingerprint says "
                                 f"{n} units of {' x '.join(map(str, width))}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise PatchError(f"{where}: {side} slice {name!r} has NaN/inf values (or is not floating point); "
                                 "refusing to transfer")
            dtypes.add(t.dtype)
        if donor[name].shape != target[name].shape:
            raise PatchError(f"{where}: slice {name!r} has shape {tuple(donor[name].shape)} in the donor and "
                             f"{tuple(target[name].shape)} in the target")
    if len(dtypes) > 1:
        raise PatchError(f"{where}: slices of several dtypes {sorted(map(str, dtypes))}")


def _equal(have: torch.Tensor, want: torch.Tensor) -> bool:
    """A model's slice (on its layer's device) bit-equal to the patch's (on the device the patch came from: the CPU
    for a loaded patch)."""
    return torch.equal(have, want.to(have.device))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class NeuronPatch:
    fingerprint: ArchFingerprint
    donor: str
    target: str
    units: dict[str, dict[int, torch.Tensor]]  # kind -> layer -> sorted unit indices
    donor_values: dict[str, dict[int, dict[str, torch.Tensor]]]
    target_values: dict[str, dict[int, dict[str, torch.Tensor]]]
    alpha: float = 1.0
    provenance: dict = field(default_factory=dict)
    target_total_params: int = 0
    gamma: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # per-unit amplitudes (float32); absent: 1

    # -- construction --------------------------------------------------------------------------------------------------
    @classmethod
    def extract(cls, donor, target, indices, *, alpha: float = 1.0, gamma=None, donor_name: str = "donor",
                target_name: str = "target", provenance: dict | None = None) -> "NeuronPatch":
        """Read the chosen units' slices from ``donor`` and ``target`` (same fingerprint, refused otherwise).

        ``indices``: ``{layer: idx}`` for MLP neurons, or ``{kind: {layer: idx}}`` for any kinds; ``gamma``: per-unit
        amplitudes in the same shape (aligned with ``indices`` as given), or ``None`` for one global ``alpha``."""
        try:
            fp = check_compatible(donor, target)
        except IncompatibleModelsError as e:
            raise PatchError(str(e)) from None
        alpha = check_alpha(alpha)
        kinds, gammas = by_kind(indices), by_kind(gamma) if gamma is not None else {}
        sel, gam, dv, tv = {}, {}, {}, {}
        for kind, per_layer in kinds.items():
            idx, g = _as_indices(kind, per_layer, fp, gammas.get(kind))
            if not idx:
                continue
            ud, ut = units(donor, kind), units(target, kind)
            sel[kind], dv[kind], tv[kind] = idx, {}, {}
            if g:
                gam[kind] = g
            for layer, i in idx.items():
                dv[kind][layer] = ud.read(layer, i)
                tv[kind][layer] = ut.read(layer, i)
                _check_values(kind, layer, len(i), fp, dv[kind][layer], tv[kind][layer])
        if not sel:
            raise PatchError("a patch needs at least one unit")
        return cls(fp, donor_name, target_name, sel, dv, tv, float(alpha),
                   {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(provenance or {})}, total_params(target), gam)

    # -- sizes ---------------------------------------------------------------------------------------------------------
    @property
    def indices(self) -> dict[int, torch.Tensor]:
        """The MLP neurons' indices per layer (the patch's units of kind ``"mlp"``)."""
        return self.units.get("mlp", {})

    def n_units(self, kind: str) -> int:
        return sum(int(i.numel()) for i in self.units.get(kind, {}).values())

    @property
    def n_neurons(self) -> int:
        return self.n_units("mlp")

    @property
    def neuron_fraction(self) -> float:
        return self.n_neurons / self.fingerprint.n_neurons

    def unit_fraction(self, kind: str) -> float:
        """Share of the model's units of ``kind`` that the patch transfers."""
        return self.n_units(kind) / self.fingerprint.n_units(kind)

    @property
    def n_params(self) -> int:
        return sum(v.numel() for kind in self.donor_values.values() for layer in kind.values() for v in layer.values())

    @property
    def param_fraction(self) -> float:
        return self.n_params / self.target_total_params if self.target_total_params else float("nan")

    def per_layer(self, kind: str = "mlp") -> list[int]:
        idx = self.units.get(kind, {})
        return [int(idx[i].numel()) if i in idx else 0 for i in range(self.fingerprint.n_layers)]

    def unit_lists(self) -> dict[str, dict[str, list[int]]]:
        """The selected units as plain lists, ``{kind: {layer: [index, ...]}}`` (layer keys as strings: JSON)."""
        return {kind: {str(layer): idx.tolist() for layer, idx in sorted(per.items())}
                for kind, per in self.units.items()}

    def sizes(self) -> dict:
        """Units per kind, and the fractions in units and in weights (what results and patch.json record)."""
        return {"units": {k: self.n_units(k) for k in self.units},
                "unit_fractions": {k: self.unit_fraction(k) for k in self.units},
                "n_params": self.n_params, "param_fraction": self.param_fraction}

    def __repr__(self) -> str:
        kinds = ", ".join(f"{self.n_units(k)} {k}" for k in self.units)
        amp = f"alpha={self.alpha:g}" + (", per-unit gamma" if self.gamma else "")
        return (f"NeuronPatch({self.donor} -> {self.target}, {kinds} ({100 * self.neuron_fraction:.3f}% of MLP "
                f"neurons, {100 * self.param_fraction:.4f}% of weights), {amp}, {self.fingerprint})")

    def to(self, dtype: torch.dtype) -> "NeuronPatch":
        """A copy whose slices are in ``dtype`` (to try the patch on a copy of the target in another precision, e.g.
        bf16 proxies); the units, amplitudes and metadata are the same."""
        def cast(values):
            return {kind: {layer: {k: t.to(dtype) for k, t in d.items()} for layer, d in per.items()}
                    for kind, per in values.items()}
        return dataclasses.replace(self, donor_values=cast(self.donor_values), target_values=cast(self.target_values))

    # -- apply / revert ------------------------------------------------------------------------------------------------
    def amplitudes(self, kind: str, layer: int) -> torch.Tensor | None:
        """α·γ_i for each unit of ``kind`` in ``layer`` (``None`` when all are exactly 1: the donor's slices)."""
        g = self.gamma.get(kind, {}).get(layer)
        if g is None:
            return None if self.alpha == 1.0 else torch.full((len(self.units[kind][layer]),), float(self.alpha))
        a = self.alpha * g
        return None if bool((a == 1.0).all()) else a

    def patched_values(self, layer: int, kind: str = "mlp") -> dict[str, torch.Tensor]:
        a = self.amplitudes(kind, layer)
        if a is None:
            return self.donor_values[kind][layer]
        target = self.target_values[kind][layer]
        # the amplitudes live on the CPU, the slices on their layer's device (one device for all of a layer's slots)
        a = a.to(next(iter(target.values())).device)
        out = {}
        for k, t in target.items():
            shape = (-1,) + (1,) * (t.dim() - 1)
            out[k] = (t.float() + a.view(shape) * (self.donor_values[kind][layer][k].float() - t.float())).to(t.dtype)
        return out

    def _slices(self):
        for kind, per_layer in self.units.items():
            for layer, idx in per_layer.items():
                yield kind, layer, idx

    def _check(self, model, expect: str) -> dict:
        readers = {kind: units(model, kind) for kind in self.units}
        fp = fingerprint_of(model)
        mine = self.fingerprint
        if (fp if mine.attention is not None else fp.mlp_only()) != mine:
            raise PatchError(f"patch is for {mine}, model is {fp}")
        for kind, layer, idx in self._slices():
            want = self.target_values[kind][layer] if expect == "target" else self.patched_values(layer, kind)
            have = readers[kind].read(layer, idx)
            if set(have) != set(want):
                raise PatchError(f"model's {kind} units in layer {layer} have slices {sorted(have)}, the patch "
                                 f"{sorted(want)}: not the patch's architecture (e.g. biases on one side only)")
            mismatched = {have[k].dtype for k in want if have[k].dtype != want[k].dtype}
            if mismatched:
                raise PatchError(f"the patch holds {_dtype_name(next(iter(want.values())).dtype)} slices, the model "
                                 f"is {_dtype_name(mismatched.pop())}: load the model in the patch's dtype "
                                 "(load_model(..., dtype=...)) to apply or revert it")
            if not all(_equal(have[k], want[k]) for k in want):
                if expect == "target":
                    if self._matches(readers, "patched"):
                        state = "the patch is already applied to it" + (
                            f", or it is the patch's donor ({self.donor})" if self._matches(readers, "donor") else "")
                    elif self._matches(readers, "donor"):
                        state = f"it is the patch's donor ({self.donor}), not its target ({self.target})"
                    else:
                        state = f"this is not the patch's target model ({self.target})"
                    raise PatchError(f"model's {kind} units in layer {layer} differ from the target's originals: "
                                     f"{state}")
                raise PatchError(f"model's {kind} units in layer {layer} are not the patched values: the patch is not "
                                 "applied to this model (or it was changed since)")
        return readers

    def _matches(self, readers: dict, expect: str) -> bool:
        for kind, layer, idx in self._slices():
            want = {"target": self.target_values, "donor": self.donor_values}[expect][kind][layer] \
                if expect != "patched" else self.patched_values(layer, kind)
            have = readers[kind].read(layer, idx)
            if not all(have[k].dtype == want[k].dtype and _equal(have[k], want[k]) for k in want):
                return False
        return True

    def is_applied(self, model) -> bool:
        return self._matches({kind: units(model, kind) for kind in self.units}, "patched")

    def apply(self, model):
        """Write the patch into ``model`` (in place). Refused, with nothing changed, on any mismatch."""
        readers = self._check(model, "target")
        for kind, layer, idx in self._slices():
            readers[kind].write(layer, idx, self.patched_values(layer, kind))
        return model

    def revert(self, model):
        """Restore the target's original slices (bit-exact). Refused unless the patch is applied."""
        readers = self._check(model, "patched")
        for kind, layer, idx in self._slices():
            readers[kind].write(layer, idx, self.target_values[kind][layer])
        return model

    # -- composition ---------------------------------------------------------------------------------------------------
    def overlap(self, other: "NeuronPatch") -> dict:
        """Shared units: ``{layer: [idx]}`` for MLP neurons, ``{(kind, layer): [idx]}`` for other kinds."""
        out = {}
        for kind, layer, idx in self._slices():
            theirs = other.units.get(kind, {}).get(layer)
            if theirs is not None:
                common = sorted(set(idx.tolist()) & set(theirs.tolist()))
                if common:
                    out[layer if kind == "mlp" else (kind, layer)] = common
        return out

    @staticmethod
    def compose(patches: Sequence["NeuronPatch"]) -> "NeuronPatch":
        """One patch from patches with disjoint unit sets (same fingerprint and target); refused if they overlap."""
        if not patches:
            raise PatchError("nothing to compose")
        first = patches[0]
        for i, p in enumerate(patches):
            both_attention = None not in (p.fingerprint.attention, first.fingerprint.attention)
            if p.fingerprint.mlp_only() != first.fingerprint.mlp_only() or \
                    both_attention and p.fingerprint != first.fingerprint:
                raise PatchError("patches are for different architectures")
            if p.target != first.target or p.target_total_params != first.target_total_params:
                raise PatchError(f"patches are for different targets ({first.target!r} and {p.target!r}); they do not "
                                 "compose")
            for q in patches[i + 1:]:
                ov = p.overlap(q)
                if ov:
                    n = sum(map(len, ov.values()))
                    where = f"neurons (layers {sorted(ov)})" if all(isinstance(k, int) for k in ov) else \
                        f"units ({', '.join(map(str, ov))})"
                    raise PatchError(f"patches overlap in {n} {where}; they do not compose")
        sel, dv, tv = {}, {}, {}
        for p in patches:
            for kind, layer, idx in p._slices():
                pv, tgt = p.patched_values(layer, kind), p.target_values[kind][layer]
                s, d, t = sel.setdefault(kind, {}), dv.setdefault(kind, {}), tv.setdefault(kind, {})
                if layer in s:
                    order = torch.argsort(torch.cat([s[layer], idx]))
                    s[layer] = torch.cat([s[layer], idx])[order]
                    d[layer] = {k: torch.cat([d[layer][k], pv[k]])[order] for k in pv}
                    t[layer] = {k: torch.cat([t[layer][k], tgt[k]])[order] for k in pv}
                else:
                    s[layer], d[layer], t[layer] = idx, dict(pv), dict(tgt)
        fp = next((p.fingerprint for p in patches if p.fingerprint.attention is not None), first.fingerprint)
        return NeuronPatch(fp, "+".join(dict.fromkeys(p.donor for p in patches)), first.target,
                           {k: dict(sorted(v.items())) for k, v in sel.items()}, dv, tv, 1.0,
                           {"composed_from": [p.provenance for p in patches],
                            "alphas": [p.alpha for p in patches]}, first.target_total_params)

    # -- files ---------------------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind, layer, idx in self._slices():
            out[f"{kind}.{layer}.indices"] = idx.contiguous()
            for k, v in self.donor_values[kind][layer].items():
                out[f"{kind}.{layer}.donor.{k}"] = v.contiguous()
            for k, v in self.target_values[kind][layer].items():
                out[f"{kind}.{layer}.target.{k}"] = v.contiguous()
            if layer in self.gamma.get(kind, {}):
                out[f"{kind}.{layer}.gamma"] = self.gamma[kind][layer].contiguous()
        return out

    def _metadata(self, tensor_bytes: bytes) -> dict:
        meta = {
            "format": "cnt.NeuronPatch", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint.to_dict(),
            "donor": self.donor, "target": self.target, "alpha": self.alpha, "per_unit_gamma": bool(self.gamma),
            "dtype": self.dtype, "provenance": self.provenance, "n_neurons": self.n_neurons,
            "neuron_fraction": self.neuron_fraction, **self.sizes(), "target_total_params": self.target_total_params,
            "per_layer": self.per_layer(), "per_layer_units": {k: self.per_layer(k) for k in self.units},
            "sha256": hashlib.sha256(tensor_bytes).hexdigest(), "bytes": len(tensor_bytes),
        }
        return json.loads(json.dumps(meta, default=str))  # exactly what load will read back

    @property
    def dtype(self) -> str:
        """The dtype of the patch's slices (that of the models it was extracted from)."""
        kind, layer, _ = next(self._slices())
        return _dtype_name(next(iter(self.target_values[kind][layer].values())).dtype)

    def save(self, directory: str | Path, extra_files: Mapping[str, str] | None = None) -> Path:
        """Write ``patch.safetensors`` and ``patch.json`` (and ``extra_files``: name -> text, e.g. a run's record)
        as the folder ``directory``, atomically: the folder is replaced as a whole, so an interrupted save leaves the
        previous patch there intact. An existing folder that is not a patch folder is refused."""
        from safetensors.torch import save

        d = atomic.check_output(directory, "folder", what="patch folder", marker="patch.json")
        data = save(self._tensors())
        meta = self._metadata(data)
        meta["checksum"] = _checksum(meta)
        with atomic.folder(d) as tmp:
            (tmp / "patch.safetensors").write_bytes(data)
            (tmp / "patch.json").write_text(json.dumps(meta, indent=1) + "\n")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronPatch":
        """Read a patch folder; every check ``extract`` makes is repeated, and every metadata field is validated
        against the tensors (and, from format version 3, against the checksum over both)."""
        from safetensors.torch import load

        d = Path(directory)
        st, js = d / "patch.safetensors", d / "patch.json"
        if not st.is_file() or not js.is_file():
            raise PatchError(f"{d} is not a patch folder: it needs patch.safetensors and patch.json")
        try:
            meta = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PatchError(f"{js} is not valid JSON ({e}); the patch is damaged") from None
        data = st.read_bytes()
        fp, alpha = _check_metadata(meta, js, data)
        try:
            tensors = load(data)
        except Exception as e:  # safetensors' own error types
            raise PatchError(f"{st} cannot be read ({e}); the patch is damaged") from None
        sel, dv, tv, gam = _parse_tensors(tensors, st)
        for kind, per_layer in sel.items():  # the checks extract makes
            idx, _ = _as_indices(kind, per_layer, fp, gam.get(kind))
            for layer, i in per_layer.items():
                if not torch.equal(idx[layer], i.to(torch.long)):
                    raise PatchError(f"{st}: {kind} layer {layer}: unit indices are not sorted")
                _check_values(kind, layer, len(i), fp, dv.get(kind, {}).get(layer, {}),
                              tv.get(kind, {}).get(layer, {}))
        patch = cls(fp, meta["donor"], meta["target"], {k: dict(sorted(v.items())) for k, v in sel.items()}, dv, tv,
                    alpha, meta.get("provenance", {}), int(meta.get("target_total_params", 0)), gam)
        patch._check_sizes(meta, js)
        return patch

    def _check_sizes(self, meta: dict, js: Path) -> None:
        """The metadata's counts and dtype against the tensors (what a hand edit of patch.json would break)."""
        if not self.units:
            raise PatchError(f"{js}: the patch holds no units")
        if bool(meta.get("per_unit_gamma", bool(self.gamma))) != bool(self.gamma):
            raise PatchError(f"{js}: field 'per_unit_gamma' is {meta.get('per_unit_gamma')!r} but the tensors "
                             f"{'hold' if self.gamma else 'hold no'} per-unit amplitudes")
        checks = {"dtype": self.dtype, "n_neurons": self.n_neurons, "n_params": self.n_params,
                  "per_layer": self.per_layer(),
                  "per_layer_units": {k: self.per_layer(k) for k in self.units},
                  "units": {k: self.n_units(k) for k in self.units}}
        for name, value in checks.items():
            if name in meta and meta[name] != value:
                raise PatchError(f"{js}: field {name!r} is {meta[name]!r} but the tensors say {value!r}: patch.json "
                                 "was edited or does not belong to these tensors")

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())


def _checksum(meta: dict) -> str:
    """sha256 over every metadata field but the checksum itself (which includes the tensors' sha256)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


_FIELD_TYPES = {"format": str, "format_version": int, "fingerprint": dict, "donor": str, "target": str,
                "sha256": str}
_OPTIONAL_TYPES = {"provenance": dict, "target_total_params": int, "bytes": int, "per_unit_gamma": bool, "dtype": str,
                   "checksum": str, "n_neurons": int, "n_params": int, "per_layer": list, "per_layer_units": dict,
                   "units": dict}


def _check_metadata(meta, js: Path, data: bytes) -> tuple[ArchFingerprint, float]:
    """patch.json's fields: present, of their types, the format readable, the tensors' size and sha256 and the
    checksum matching; returns the fingerprint and α. Each failure names the field."""
    if not isinstance(meta, dict):
        raise PatchError(f"{js} holds a JSON {type(meta).__name__}, not the patch's metadata object; the patch is "
                         "damaged")
    if meta.get("format") != "cnt.NeuronPatch" or meta.get("format_version") not in READABLE_VERSIONS \
            or isinstance(meta.get("format_version"), bool):
        raise PatchError(f"{js}: not a cnt.NeuronPatch of format version {' or '.join(map(str, READABLE_VERSIONS))} "
                         f"(fields 'format', 'format_version')")
    for name, typ in {**_FIELD_TYPES, **_OPTIONAL_TYPES}.items():
        if name not in meta:
            if name in _FIELD_TYPES or (name == "checksum" and meta["format_version"] >= 3):
                raise PatchError(f"{js}: field {name!r} is missing; the patch is damaged")
            continue
        v = meta[name]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise PatchError(f"{js}: field {name!r} must be a JSON {typ.__name__}, got {v!r}")
    if "bytes" in meta and meta["bytes"] != len(data):
        raise PatchError(f"{js}: field 'bytes' says {meta['bytes']} but patch.safetensors has {len(data)}: the file "
                         "is truncated or was replaced")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise PatchError(f"patch.safetensors does not match the sha256 in {js} (field 'sha256'): the file is "
                         "truncated or was edited")
    try:
        fp = ArchFingerprint.from_dict(meta["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        raise PatchError(f"{js}: field 'fingerprint' is not an architecture fingerprint ({e!r})") from None
    if fp.n_layers <= 0 or len(fp.intermediate_sizes) != fp.n_layers:
        raise PatchError(f"{js}: field 'fingerprint' is inconsistent ({len(fp.intermediate_sizes)} intermediate "
                         f"sizes for {fp.n_layers} layers)")
    alpha = check_alpha(meta.get("alpha"), f"{js}: field 'alpha'")
    if "checksum" in meta and meta["checksum"] != _checksum(meta):
        raise PatchError(f"{js}: field 'checksum' does not match the metadata: patch.json was edited after it was "
                         "saved (a patch is made by extract, not by hand)")
    return fp, alpha


_TENSOR_NAME = re.compile(r"^(?P<kind>layers|mlp|head|kv)\.(?P<layer>\d+)\.(?:(?P<part>indices|gamma)|"
                          r"(?P<side>donor|target)\.(?P<slice>[A-Za-z0-9_]+))$")


def _parse_tensors(tensors: dict, st: Path):
    sel, dv, tv, gam = {}, {}, {}, {}
    for name, t in tensors.items():
        m = _TENSOR_NAME.match(name)
        if m is None:
            raise PatchError(f"{st}: unexpected tensor {name!r}; the patch is damaged or not a cnt patch")
        kind, layer = ("mlp" if m["kind"] == "layers" else m["kind"]), int(m["layer"])  # version 1: "layers.{l}..."
        if m["part"] == "indices":
            sel.setdefault(kind, {})[layer] = t
        elif m["part"] == "gamma":
            gam.setdefault(kind, {})[layer] = t
        else:
            (dv if m["side"] == "donor" else tv).setdefault(kind, {}).setdefault(layer, {})[m["slice"]] = t
    for what, per_kind in (("donor slices", dv), ("target slices", tv), ("amplitudes", gam)):
        for kind, per_layer in per_kind.items():
            stray = sorted(set(per_layer) - set(sel.get(kind, {})))
            if stray:
                raise PatchError(f"{st}: {kind} {what} for layers {stray} that have no unit indices")
    return sel, dv, tv, gam


def transfer_all(donor, target, kinds: Sequence[str] = ("mlp",)) -> NeuronPatch:
    """Every unit of the given kinds in every layer (for checks and ceilings: with ``kinds=("mlp",)`` the patched
    target's MLPs equal the donor's; with every kind, its MLPs and attention projections)."""
    fp = check_compatible(donor, target)
    sel = {}
    for kind in kinds:
        sel[kind] = {i: torch.arange(_n_units(fp, kind, i)) for i in range(fp.n_layers)}
    return NeuronPatch.extract(donor, target, sel)
