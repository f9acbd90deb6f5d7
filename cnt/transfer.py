"""``NeuronPatch``: a reversible transfer of MLP neurons from a donor into a target.

A patch holds, for each layer, the transferred neuron indices, the donor's slices of those neurons and the target's
original slices, plus the amplification ``alpha`` and provenance. Applying it writes
``θ_T,i + α·(θ_D,i − θ_T,i)`` (exactly ``θ_D,i`` for ``α = 1``) into each chosen neuron ``i``; reverting writes the
originals back, bit for bit. ``apply`` refuses a model whose architecture fingerprint or current slices do not match
(a wrong model, or the patch already applied). On disk (``save``/``load``, peft-like): ``patch.safetensors`` and
``patch.json`` (metadata and the tensors' sha256, so truncated or edited files are refused).
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

from .arch import ArchFingerprint, IncompatibleModelsError, MLPNeurons, check_compatible, total_params

FORMAT_VERSION = 1


class PatchError(ValueError):
    """A patch cannot be built, loaded, applied or reverted; the message says why. Nothing was changed."""


def _as_indices(indices: Mapping[int, Sequence[int] | torch.Tensor], fp: ArchFingerprint) -> dict[int, torch.Tensor]:
    out = {}
    for layer, idx in indices.items():
        layer = int(layer)
        if not 0 <= layer < fp.n_layers:
            raise PatchError(f"layer {layer} out of range: the model has {fp.n_layers} layers")
        t = torch.as_tensor(idx, dtype=torch.long).flatten()
        if t.numel() == 0:
            continue
        t = torch.sort(t).values
        if t[0] < 0 or t[-1] >= fp.intermediate_sizes[layer]:
            raise PatchError(f"layer {layer}: neuron indices must lie in [0, {fp.intermediate_sizes[layer]})")
        if (t[1:] == t[:-1]).any():
            raise PatchError(f"layer {layer}: duplicate neuron indices")
        out[layer] = t
    if not out:
        raise PatchError("a patch needs at least one neuron")
    return dict(sorted(out.items()))


@dataclass
class NeuronPatch:
    fingerprint: ArchFingerprint
    donor: str
    target: str
    indices: dict[int, torch.Tensor]
    donor_values: dict[int, dict[str, torch.Tensor]]
    target_values: dict[int, dict[str, torch.Tensor]]
    alpha: float = 1.0
    provenance: dict = field(default_factory=dict)
    target_total_params: int = 0

    # -- construction --------------------------------------------------------------------------------------------------
    @classmethod
    def extract(cls, donor, target, indices: Mapping[int, Sequence[int] | torch.Tensor], *, alpha: float = 1.0,
                donor_name: str = "donor", target_name: str = "target", provenance: dict | None = None
                ) -> "NeuronPatch":
        """Read the chosen neurons' slices from ``donor`` and ``target`` (same fingerprint, refused otherwise)."""
        try:
            fp = check_compatible(donor, target)
        except IncompatibleModelsError as e:
            raise PatchError(str(e)) from None
        if not (isinstance(alpha, (int, float)) and torch.isfinite(torch.tensor(float(alpha)))):
            raise PatchError(f"alpha must be a finite number, got {alpha!r}")
        idx = _as_indices(indices, fp)
        nd, nt = MLPNeurons(donor), MLPNeurons(target)
        dv, tv = {}, {}
        for layer, i in idx.items():
            dv[layer] = nd.read(layer, i)
            tv[layer] = nt.read(layer, i)
            bad = [k for k, v in dv[layer].items() if not torch.isfinite(v).all()]
            if bad:
                raise PatchError(f"donor has NaN/inf in layer {layer} slices {bad}; refusing to transfer them")
        return cls(fp, donor_name, target_name, idx, dv, tv, float(alpha),
                   {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(provenance or {})}, total_params(target))

    # -- sizes ---------------------------------------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def neuron_fraction(self) -> float:
        return self.n_neurons / self.fingerprint.n_neurons

    @property
    def n_params(self) -> int:
        return sum(v.numel() for layer in self.donor_values.values() for v in layer.values())

    @property
    def param_fraction(self) -> float:
        return self.n_params / self.target_total_params if self.target_total_params else float("nan")

    def per_layer(self) -> list[int]:
        return [int(self.indices[i].numel()) if i in self.indices else 0 for i in range(self.fingerprint.n_layers)]

    def __repr__(self) -> str:
        return (f"NeuronPatch({self.donor} -> {self.target}, {self.n_neurons} neurons "
                f"({100 * self.neuron_fraction:.3f}% of MLP neurons, {100 * self.param_fraction:.4f}% of weights), "
                f"alpha={self.alpha:g}, {self.fingerprint})")

    # -- apply / revert ------------------------------------------------------------------------------------------------
    def patched_values(self, layer: int) -> dict[str, torch.Tensor]:
        if self.alpha == 1.0:
            return self.donor_values[layer]
        return {k: (t.float() + self.alpha * (self.donor_values[layer][k].float() - t.float())).to(t.dtype)
                for k, t in self.target_values[layer].items()}

    def _check(self, model, expect: str) -> MLPNeurons:
        neurons = MLPNeurons(model)
        fp = neurons.fingerprint()
        if fp != self.fingerprint:
            raise PatchError(f"patch is for {self.fingerprint}, model is {fp}")
        for layer, idx in self.indices.items():
            want = self.target_values[layer] if expect == "target" else self.patched_values(layer)
            have = neurons.read(layer, idx)
            if set(have) != set(want) or any(not torch.equal(have[k], want[k].to(have[k].dtype)) for k in want):
                if expect == "target":
                    state = "the patch is already applied" if self._matches(neurons, "patched") else \
                        "this is not the patch's target model"
                    raise PatchError(f"model's neurons in layer {layer} differ from the target's originals: {state}")
                raise PatchError(f"model's neurons in layer {layer} are not the patched values: the patch is not "
                                 "applied to this model (or it was changed since)")
        return neurons

    def _matches(self, neurons: MLPNeurons, expect: str) -> bool:
        for layer, idx in self.indices.items():
            want = self.target_values[layer] if expect == "target" else self.patched_values(layer)
            have = neurons.read(layer, idx)
            if any(not torch.equal(have[k], want[k].to(have[k].dtype)) for k in want):
                return False
        return True

    def is_applied(self, model) -> bool:
        return self._matches(MLPNeurons(model), "patched")

    def apply(self, model):
        """Write the patch into ``model`` (in place). Refused, with nothing changed, on any mismatch."""
        neurons = self._check(model, "target")
        for layer, idx in self.indices.items():
            neurons.write(layer, idx, self.patched_values(layer))
        return model

    def revert(self, model):
        """Restore the target's original slices (bit-exact). Refused unless the patch is applied."""
        neurons = self._check(model, "patched")
        for layer, idx in self.indices.items():
            neurons.write(layer, idx, self.target_values[layer])
        return model

    # -- composition ---------------------------------------------------------------------------------------------------
    def overlap(self, other: "NeuronPatch") -> dict[int, list[int]]:
        out = {}
        for layer, idx in self.indices.items():
            if layer in other.indices:
                common = sorted(set(idx.tolist()) & set(other.indices[layer].tolist()))
                if common:
                    out[layer] = common
        return out

    @staticmethod
    def compose(patches: Sequence["NeuronPatch"]) -> "NeuronPatch":
        """One patch from patches with disjoint neuron sets (same fingerprint and target); refused if they overlap."""
        if not patches:
            raise PatchError("nothing to compose")
        first = patches[0]
        for i, p in enumerate(patches):
            if p.fingerprint != first.fingerprint:
                raise PatchError("patches are for different architectures")
            for q in patches[i + 1:]:
                ov = p.overlap(q)
                if ov:
                    n = sum(map(len, ov.values()))
                    raise PatchError(f"patches overlap in {n} neurons (layers {sorted(ov)}); they do not compose")
        indices, dv, tv = {}, {}, {}
        for p in patches:
            for layer, idx in p.indices.items():
                pv = p.patched_values(layer)
                if layer in indices:
                    order = torch.argsort(torch.cat([indices[layer], idx]))
                    indices[layer] = torch.cat([indices[layer], idx])[order]
                    dv[layer] = {k: torch.cat([dv[layer][k], pv[k]])[order] for k in pv}
                    tv[layer] = {k: torch.cat([tv[layer][k], p.target_values[layer][k]])[order] for k in pv}
                else:
                    indices[layer], dv[layer], tv[layer] = idx, dict(pv), dict(p.target_values[layer])
        return NeuronPatch(first.fingerprint, "+".join(dict.fromkeys(p.donor for p in patches)), first.target,
                           dict(sorted(indices.items())), dv, tv, 1.0,
                           {"composed_from": [p.provenance for p in patches],
                            "alphas": [p.alpha for p in patches]}, first.target_total_params)

    # -- files ---------------------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, idx in self.indices.items():
            out[f"layers.{layer}.indices"] = idx.contiguous()
            for k, v in self.donor_values[layer].items():
                out[f"layers.{layer}.donor.{k}"] = v.contiguous()
            for k, v in self.target_values[layer].items():
                out[f"layers.{layer}.target.{k}"] = v.contiguous()
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
            "donor": self.donor, "target": self.target, "alpha": self.alpha, "provenance": self.provenance,
            "n_neurons": self.n_neurons, "neuron_fraction": self.neuron_fraction, "n_params": self.n_params,
            "param_fraction": self.param_fraction, "target_total_params": self.target_total_params,
            "per_layer": self.per_layer(), "sha256": hashlib.sha256(st.read_bytes()).hexdigest(),
            "bytes": st.stat().st_size,
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
        if meta.get("format") != "cnt.NeuronPatch" or meta.get("format_version") != FORMAT_VERSION:
            raise PatchError(f"{js}: not a cnt.NeuronPatch of format version {FORMAT_VERSION}")
        if hashlib.sha256(st.read_bytes()).hexdigest() != meta.get("sha256"):
            raise PatchError(f"{st} does not match the sha256 in patch.json: the file is truncated or was edited")
        tensors = load_file(str(st))
        indices, dv, tv = {}, {}, {}
        for name, t in tensors.items():
            _, layer, kind, *rest = name.split(".")
            layer = int(layer)
            if kind == "indices":
                indices[layer] = t
            else:
                (dv if kind == "donor" else tv).setdefault(layer, {})[rest[0]] = t
        return cls(ArchFingerprint.from_dict(meta["fingerprint"]), meta["donor"], meta["target"],
                   dict(sorted(indices.items())), dv, tv, float(meta["alpha"]), meta.get("provenance", {}),
                   int(meta.get("target_total_params", 0)))

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())


def transfer_all(donor, target) -> NeuronPatch:
    """Every MLP neuron of every layer (for checks: the patched target's MLPs equal the donor's)."""
    fp = check_compatible(donor, target)
    return NeuronPatch.extract(donor, target, {i: torch.arange(n) for i, n in enumerate(fp.intermediate_sizes)})
