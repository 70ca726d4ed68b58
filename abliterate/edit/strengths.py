"""Per-layer strength profiles: a few numbers that say how strongly each layer's writers are edited.

A search cannot afford one free parameter per layer and component, and neighbouring layers tend to
want similar strengths, so each component (attn, mlp) gets a tent-shaped profile: `peak` at layer
`center`, falling linearly over `width` layers to `floor * peak`, and `floor * peak` beyond. floor = 1
is a uniform strength (floor = 1, peak = 1 is the plain full ablation). The embedding is one module, so
it gets a single strength. The profiles become `EditOptions.layer_scales`, which both the weight edit
and the ablation hooks read (`EditOptions.strength`), so a searched point is applied exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from abliterate.arch.writers import COMPONENTS

LAYERED = tuple(c for c in COMPONENTS if c != "embed")


@dataclass(frozen=True)
class Profile:
    peak: float  # the largest strength (1: remove the direction fully)
    center: float  # the layer (may be fractional) where the peak sits
    width: float  # layers from the peak to where the floor starts (> 0)
    floor: float  # strength far from the peak, as a fraction of peak, in [0, 1]

    def scale(self, layer: int) -> float:
        tent = max(0.0, 1.0 - abs(layer - self.center) / max(self.width, 1e-6))
        return self.peak * (self.floor + (1.0 - self.floor) * tent)

    def scales(self, num_layers: int) -> tuple[float, ...]:
        return tuple(self.scale(layer) for layer in range(num_layers))


def uniform(strength: float = 1.0) -> Profile:
    return Profile(peak=strength, center=0.0, width=1.0, floor=1.0)


def layer_scales(profiles: dict[str, Profile], embed: float, num_layers: int) -> dict[str, tuple[float, ...]]:
    """EditOptions.layer_scales for these profiles (embed: one entry)."""
    scales: dict[str, tuple[float, ...]] = {"embed": (float(embed),)}
    for component in LAYERED:
        scales[component] = profiles[component].scales(num_layers)
    return scales
