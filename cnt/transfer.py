"""``NeuronPatch``: a reversible transfer of units — MLP neurons, attention heads, k/v groups — from a donor into a target.

A patch holds, for each kind of unit (``cnt.arch.UNIT_KINDS``) and layer, the transferred unit indices, the donor's
slices of those units and the target's original slices, a per-unit amplitude ``γ`` (optional) and one global ``alpha``,
plus provenance. Applying it writes ``θ_T,i + α·γ_i·(θ_D,i − θ_T,i)`` into each chosen unit ``i`` (exactly ``θ_D,i``
where ``α·γ_i = 1``; without per-unit amplitudes ``γ_i = 1``: one global α is the special case); reverting writes the
originals back, bit for bit. ``apply`` refuses a model whose architecture fingerprint or current slices do not match
(a wrong model, or the patch already applied). On disk (``save``/``load``, peft-like): ``patch.safetensors`` and
``patch.json`` (metadata and the tensors' sha256, so truncated or edited files are refused). Files of format version 1
(MLP neurons and one α) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .arch import UNIT_KINDS, ArchFingerprint, IncompatibleModelsError, check_compatible, total_params, units
from .arch import fingerprint as fingerprint_of

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

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


def _n_units(fp: ArchFingerprint, kind: str, layer: int) -> int:
    if kind == "mlp":
        return fp.intermediate_sizes[layer]
    if fp.attention is None:
        raise PatchError(f"{fp.family}: the patch has {kind} units but no attention layout")
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
            if not torch.isfinite(g).all() or (g < 0).any():
                raise PatchError(f"{kind} layer {layer}: per-unit amplitudes must be finite and >= 0")
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
        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and torch.isfinite(torch.tensor(float(alpha)))):
            raise PatchError(f"alpha must be a finite number, got {alpha!r}")
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
                bad = [k for k, v in dv[kind][layer].items() if not torch.isfinite(v).all()]
                if bad:
                    raise PatchError(f"donor has NaN/inf in {kind} layer {layer} slices {bad}; refusing to transfer")
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
        out = {}
        for k, t in self.target_values[kind][layer].items():
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
            if set(have) != set(want) or any(not torch.equal(have[k], want[k].to(have[k].dtype)) for k in want):
                if expect == "target":
                    state = "the patch is already applied" if self._matches(readers, "patched") else \
                        "this is not the patch's target model"
                    raise PatchError(f"model's {kind} units in layer {layer} differ from the target's originals: "
                                     f"{state}")
                raise PatchError(f"model's {kind} units in layer {layer} are not the patched values: the patch is not "
                                 "applied to this model (or it was changed since)")
        return readers

    def _matches(self, readers: dict, expect: str) -> bool:
        for kind, layer, idx in self._slices():
            want = self.target_values[kind][layer] if expect == "target" else self.patched_values(layer, kind)
            have = readers[kind].read(layer, idx)
            if any(not torch.equal(have[k], want[k].to(have[k].dtype)) for k in want):
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
            if p.fingerprint.mlp_only() != first.fingerprint.mlp_only() or \
                    None not in (p.fingerprint.attention, first.fingerprint.attention) and p.fingerprint != first.fingerprint:
                raise PatchError("patches are for different architectures")
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

    def save(self, directory: str | Path) -> Path:
        """Write ``patch.safetensors`` and ``patch.json`` into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        st = d / "patch.safetensors"
        save_file(self._tensors(), str(st))
        os.chmod(st, 0o644)  # safetensors writes files private; a patch is meant to be shared
        meta = {
            "format": "cnt.NeuronPatch", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint.to_dict(),
            "donor": self.donor, "target": self.target, "alpha": self.alpha, "per_unit_gamma": bool(self.gamma),
            "provenance": self.provenance, "n_neurons": self.n_neurons, "neuron_fraction": self.neuron_fraction,
            **self.sizes(), "target_total_params": self.target_total_params, "per_layer": self.per_layer(),
            "per_layer_units": {k: self.per_layer(k) for k in self.units},
            "sha256": hashlib.sha256(st.read_bytes()).hexdigest(), "bytes": st.stat().st_size,
        }
        (d / "patch.json").write_text(json.dumps(meta, indent=1) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronPatch":
        from safetensors.torch import load_file

        d = Path(directory)
        st, js = d / "patch.safetensors", d / "patch.json"
        if not st.is_file() or not js.is_file():
            raise PatchError(f"{d} is not a patch folder: it needs patch.safetensors and patch.json")
        try:
            meta = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise PatchError(f"{js} is not valid JSON ({e}); the patch is damaged") from None
        if meta.get("format") != "cnt.NeuronPatch" or meta.get("format_version") not in READABLE_VERSIONS:
            raise PatchError(f"{js}: not a cnt.NeuronPatch of format version {' or '.join(map(str, READABLE_VERSIONS))}")
        if hashlib.sha256(st.read_bytes()).hexdigest() != meta.get("sha256"):
            raise PatchError(f"{st} does not match the sha256 in patch.json: the file is truncated or was edited")
        tensors = load_file(str(st))
        sel, dv, tv, gam = {}, {}, {}, {}
        for name, t in tensors.items():
            kind, layer, part, *rest = name.split(".")
            kind, layer = ("mlp" if kind == "layers" else kind), int(layer)  # version 1: "layers.{l}...", MLP only
            if part == "indices":
                sel.setdefault(kind, {})[layer] = t
            elif part == "gamma":
                gam.setdefault(kind, {})[layer] = t
            else:
                (dv if part == "donor" else tv).setdefault(kind, {}).setdefault(layer, {})[rest[0]] = t
        fp = ArchFingerprint.from_dict(meta["fingerprint"])
        alpha = meta.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not torch.isfinite(torch.tensor(float(alpha))):
            raise PatchError(f"{js}: alpha must be a finite number, got {alpha!r}")
        for kind, per_layer in sel.items():  # the checks extract makes: indices in range, amplitudes finite
            _as_indices(kind, per_layer, fp, gam.get(kind))
        return cls(fp, meta["donor"], meta["target"], {k: dict(sorted(v.items())) for k, v in sel.items()}, dv, tv,
                   float(alpha), meta.get("provenance", {}), int(meta.get("target_total_params", 0)), gam)

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())


def transfer_all(donor, target, kinds: Sequence[str] = ("mlp",)) -> NeuronPatch:
    """Every unit of the given kinds in every layer (for checks and ceilings: with ``kinds=("mlp",)`` the patched
    target's MLPs equal the donor's; with every kind, its MLPs and attention projections)."""
    fp = check_compatible(donor, target)
    sel = {}
    for kind in kinds:
        sel[kind] = {i: torch.arange(_n_units(fp, kind, i)) for i in range(fp.n_layers)}
    return NeuronPatch.extract(donor, target, sel)
