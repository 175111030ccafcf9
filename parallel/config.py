"""Mesh configuration: an ICI degree and a DCN (multi-slice) degree per mesh axis."""

import dataclasses

AXES = ("data", "fsdp", "expert", "tensor")  # mesh axis order: tensor innermost (fastest links)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Degrees per axis; one ICI degree may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1
    devices: int = 0  # 0: every device; n: the first n (e.g. a 1-device reference run)

    def __post_init__(self):
        if self.devices < 0:
            raise ValueError(f"mesh.devices={self.devices} must be >= 0 (0: all devices)")
        ici = self.ici
        if ici.count(-1) > 1:
            raise ValueError(f"mesh: at most one ICI degree may be -1, got {dict(zip(AXES, ici))}")
        for name, value in zip(AXES, ici):
            if not (value == -1 or value >= 1):
                raise ValueError(f"mesh.{name}={value} must be >= 1 or -1 (fill)")
        for name, value in zip(AXES, self.dcn):
            if value < 1:
                raise ValueError(f"mesh.dcn_{name}={value} must be >= 1")

    @property
    def ici(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def dcn(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"dcn_{a}") for a in AXES)
