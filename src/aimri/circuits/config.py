"""Attribution-graph settings, torch-free so the CLI derives its options from them at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from aimri.errors import AimriError


@dataclass
class TraceConfig:
    """How a graph is built and pruned; each field is a `mri trace` option of the same name."""

    node_threshold: float = field(default=0.8, metadata={"help": "influence share kept by node pruning, in (0, 1]"})
    edge_threshold: float = field(default=0.98, metadata={"help": "score share kept by edge pruning, in (0, 1]"})
    max_feature_nodes: int = field(default=1024, metadata={"help": "features whose incoming edges are computed"})
    batch_size: int = field(default=32, metadata={"help": "targets per backward pass"})
    qk_edges: int = field(
        default=0,
        metadata={"help": "strongest edges between positions whose heads and QK attribution are computed (0: none)"},
    )
    constant_positions: int = field(
        default=1,
        metadata={"help": "leading positions held constant, without feature or error nodes (the attention sink)"},
    )

    def check(self) -> None:
        """Raises AimriError naming the first setting out of range."""
        for name in ("node_threshold", "edge_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise AimriError(f"`{name}` must be in (0, 1], got {value}")
        for name, low in (("max_feature_nodes", 1), ("batch_size", 1), ("constant_positions", 0), ("qk_edges", 0)):
            if getattr(self, name) < low:
                raise AimriError(f"`{name}` must be at least {low}, got {getattr(self, name)}")
