"""Hardware profiles for the cost model: HBM, matmul rate, links, and the achievable fraction of each.

A profile holds *spec* numbers (what the datasheet says) and *achievable fractions* (what
kernels reach). The cost model times an op at the achievable rates; physical floors and MBU /
MFU use the spec rates, so a floor is a true lower bound.

Sources of the start values: docs/reference.md ("Hardware profiles", "Measured on one H100",
"Other systems' published numbers": NCCL bus bandwidth). They are start values, not fits to any
claimed result: calibrate on real GPUs with `masep.perf.bench` and pass the file (`--calibration FILE`).

Links: GPUs `r // gpus_per_node` share a node (NVLink/NVSwitch domain); traffic between nodes
uses one InfiniBand NIC per GPU. A transfer is alpha-beta: `latency + bytes / bandwidth`,
where `nvlink_bytes_per_s` is NCCL's *bus* bandwidth (so a ring all-reduce of S bytes over n
ranks takes 2(n-1) * latency + 2(n-1)/n * S / bandwidth).

User profiles: a TOML or JSON file with `base = "a100-80g"` (optional) and any field below;
`op_latency_s` / `op_efficiency` are tables keyed by op kind.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..files import read_json

GiB = 1 << 30

# Compute op kinds the cost model times from bytes/FLOPs (schedule.py's names).
COMPUTE_KINDS = ("attention", "experts", "head")


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bytes_per_s: float  # spec HBM bandwidth
    hbm_efficiency: float  # achievable fraction of it for streaming weights / KV
    matmul_flops_per_s: float  # spec dense bf16 matmul rate
    matmul_efficiency: float  # achievable fraction
    memory_bytes: int  # HBM capacity
    reserved_bytes: int = 2 * GiB  # CUDA context, NCCL buffers, allocator slack: never for weights/KV
    gpus_per_node: int = 8  # size of one NVLink domain
    nvlink_bytes_per_s: float = 230e9  # NCCL bus bandwidth inside a node
    nvlink_latency_s: float = 2e-6  # per ring step / per transfer
    internode_bytes_per_s: float = 25e9  # one NIC per GPU
    internode_latency_s: float = 5e-6
    # Fixed time per compute op (kernel boundaries under a CUDA graph), by op kind. Given as a
    # dict, stored as sorted (kind, value) pairs so a profile is hashable (the cost model caches).
    op_latency_s: tuple = tuple((k, 5e-6) for k in COMPUTE_KINDS)
    # Per-kind multiplier on both achievable fractions (1 = the profile's fractions); calibration
    # and re-planning set these.
    op_efficiency: tuple = tuple((k, 1.0) for k in COMPUTE_KINDS)
    source: str = "built-in"  # where the numbers came from (profile, file, calibration)
    # The links in words, as a datasheet states them (printed beside every result that uses them):
    # the NVLink spec inside a node and what one node has towards the others.
    links: str = ""

    def __post_init__(self) -> None:
        for name in ("op_latency_s", "op_efficiency"):
            object.__setattr__(self, name, tuple(sorted(dict(getattr(self, name)).items())))
        for name in ("hbm_bytes_per_s", "matmul_flops_per_s", "memory_bytes", "nvlink_bytes_per_s",
                     "internode_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Hardware.{name}={getattr(self, name)!r}: must be > 0")
        for name in ("hbm_efficiency", "matmul_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Hardware.{name}={getattr(self, name)!r}: must be in (0, 1]")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"Hardware.gpus_per_node={self.gpus_per_node!r}: must be an integer >= 1")
        for kind, eff in self.op_efficiency:
            if not eff > 0:
                raise ValueError(f"Hardware.op_efficiency[{kind!r}]={eff!r}: must be > 0")

    # --- effective rates for one op kind ---------------------------------------------------------
    def efficiency(self, kind: str) -> float:
        return dict(self.op_efficiency).get(kind, 1.0)

    def hbm_rate(self, kind: str) -> float:
        """Achievable HBM rate of one op kind, never above the spec (a fitted efficiency over 1
        must not let the simulator beat the floor, perf/floor.py)."""
        return self.hbm_bytes_per_s * min(1.0, self.hbm_efficiency * self.efficiency(kind))

    def flop_rate(self, kind: str) -> float:
        return self.matmul_flops_per_s * min(1.0, self.matmul_efficiency * self.efficiency(kind))

    def latency(self, kind: str) -> float:
        return dict(self.op_latency_s).get(kind, 0.0)

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def node_span(self, rank: int) -> range:
        """The ranks that share `rank`'s node (bounded by the node, not by the plan's size)."""
        start = self.node(rank) * self.gpus_per_node
        return range(start, start + self.gpus_per_node)

    def for_rank(self, rank: int) -> "Hardware":
        """The profile rank `rank` runs on: this one (MixedHardware gives each group its own)."""
        return self

    def replace(self, **changes) -> "Hardware":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        return (f"{self.name}: HBM {self.hbm_bytes_per_s / 1e12:.2f} TB/s spec x {self.hbm_efficiency:.2f}, "
                f"bf16 {self.matmul_flops_per_s / 1e12:.0f} TFLOP/s spec x {self.matmul_efficiency:.2f}, "
                f"{self.memory_bytes / GiB:.0f} GiB, NVLink {self.nvlink_bytes_per_s / 1e9:.0f} GB/s bus "
                f"({self.gpus_per_node} GPUs/node), inter-node {self.internode_bytes_per_s / 1e9:.0f} GB/s per GPU "
                f"[{self.source}]" + (f"; links: {self.links}" if self.links else ""))

    def link_info(self) -> dict:
        """The link assumptions as numbers and words (JSON meta of every simulated result)."""
        return dict(gpus_per_node=self.gpus_per_node, nvlink_bus_gb_s=self.nvlink_bytes_per_s / 1e9,
                    nvlink_latency_us=self.nvlink_latency_s * 1e6,
                    internode_gb_s_per_gpu=self.internode_bytes_per_s / 1e9,
                    internode_latency_us=self.internode_latency_s * 1e6, links=self.links)


HOPPER_LINKS = ("NVLink 4 + NVSwitch, 900 GB/s bidirectional per GPU (NCCL bus bandwidth ~370 GB/s); between "
                "nodes 8 x 400 Gb/s NDR InfiniBand per 8-GPU node, i.e. 50 GB/s per GPU")
PROFILES: dict[str, Hardware] = {
    # A100 80GB SXM: 2.04 TB/s spec, ~1.6-1.7 achievable; NVLink 3 ~230 GB/s NCCL bus bandwidth;
    # HDR InfiniBand 200 Gb/s per GPU between nodes (DGX A100).
    "a100-80g": Hardware("a100-80g", hbm_bytes_per_s=2.039e12, hbm_efficiency=0.81,
                         matmul_flops_per_s=312e12, matmul_efficiency=0.80, memory_bytes=80 * GiB,
                         nvlink_bytes_per_s=230e9, nvlink_latency_s=2e-6,
                         internode_bytes_per_s=25e9, internode_latency_s=5e-6,
                         links="NVLink 3 + NVSwitch, 600 GB/s bidirectional per GPU (NCCL bus bandwidth ~230 GB/s); "
                               "between nodes 8 x 200 Gb/s HDR InfiniBand per 8-GPU node, i.e. 25 GB/s per GPU"),
    # H100 80GB SXM: 3.35 TB/s spec, ~3.0 measured copy; ~990 TFLOP/s spec, ~775 measured;
    # NVLink 4 ~370 GB/s bus bandwidth; NDR 400 Gb/s per GPU.
    "h100": Hardware("h100", hbm_bytes_per_s=3.35e12, hbm_efficiency=0.90, matmul_flops_per_s=989e12,
                     matmul_efficiency=0.78, memory_bytes=80 * GiB, nvlink_bytes_per_s=370e9,
                     nvlink_latency_s=1e-6, internode_bytes_per_s=50e9, internode_latency_s=4e-6,
                     links=HOPPER_LINKS),
    # H200 141GB: 4.8 TB/s spec, ~4.3 measured copy; compute as H100.
    "h200": Hardware("h200", hbm_bytes_per_s=4.8e12, hbm_efficiency=0.90, matmul_flops_per_s=989e12,
                     matmul_efficiency=0.78, memory_bytes=140 * GiB, nvlink_bytes_per_s=370e9,
                     nvlink_latency_s=1e-6, internode_bytes_per_s=50e9, internode_latency_s=4e-6,
                     links=HOPPER_LINKS),
    # GB200 NVL72-like, from datasheet values only (nothing here was measured): one Blackwell GPU of the rack
    # has ~186 GB of HBM3e (13.4 TB over 72 GPUs) at 8 TB/s and ~2.5 PFLOP/s dense bf16 (180 PFLOP/s over 72);
    # NVLink 5 gives 1.8 TB/s bidirectional per GPU across all 72 GPUs of the rack (one NVLink domain). The
    # achievable fractions are the Hopper profiles' (assumed, not measured on Blackwell); the NCCL bus
    # bandwidth is assumed to double Hopper's with the doubled NVLink; one 400 Gb/s NIC per GPU out of the rack.
    "gb200-nvl72": Hardware("gb200-nvl72", hbm_bytes_per_s=8.0e12, hbm_efficiency=0.90, matmul_flops_per_s=2.5e15,
                            matmul_efficiency=0.78, memory_bytes=186 * 10**9, gpus_per_node=72,
                            nvlink_bytes_per_s=740e9, nvlink_latency_s=1e-6, internode_bytes_per_s=50e9,
                            internode_latency_s=4e-6, source="datasheet values (not measured)",
                            links="NVLink 5 + NVLink Switch, 1.8 TB/s bidirectional per GPU across the 72-GPU rack "
                                  "(NCCL bus bandwidth assumed ~740 GB/s); out of the rack one 400 Gb/s NIC per GPU, "
                                  "i.e. 50 GB/s per GPU"),
}
PROFILES["a100"] = PROFILES["a100-80g"]


@dataclass(frozen=True)
class MixedHardware:
    """A separated plan on two kinds of GPU: attention ranks [0, attention_ranks) run on `attention`, the
    expert ranks on `experts`. A node holds one kind, so each group has nodes of its own (the attention
    group's last node may be partly used): a transfer between the groups always leaves the node, and runs at
    the slower side's NIC. Inside a group, each kind's own NVLink. `attention_ranks` is set by `bind(plan)`."""
    attention: Hardware
    experts: Hardware
    attention_ranks: int | None = None

    def __post_init__(self) -> None:
        if self.attention_ranks is not None and (not isinstance(self.attention_ranks, int) or self.attention_ranks < 1):
            raise ValueError(f"MixedHardware.attention_ranks={self.attention_ranks!r}: must be an integer >= 1")

    def bind(self, plan) -> "MixedHardware":
        """This split for `plan`, which must be a separated plan (only it has two groups to put apart)."""
        if plan.strategy != "separated":
            raise ValueError(f"hardware {self.name}: attention and experts on two kinds of GPU needs a separated plan, "
                             f"not {plan.strategy} (its ranks do both)")
        return dataclasses.replace(self, attention_ranks=plan.num_attention_ranks)

    @property
    def bound_ranks(self) -> int:
        if self.attention_ranks is None:
            raise ValueError(f"hardware {self.name}: not bound to a plan; call .bind(plan) first")
        return self.attention_ranks

    @property
    def name(self) -> str:
        return f"{self.attention.name} (attention) + {self.experts.name} (experts)"

    @property
    def source(self) -> str:
        return f"attention: {self.attention.source}; experts: {self.experts.source}"

    def for_rank(self, rank: int) -> Hardware:
        return self.attention if rank < self.bound_ranks else self.experts

    def node(self, rank: int) -> int:
        a = self.bound_ranks
        if rank < a:
            return rank // self.attention.gpus_per_node
        return -(-a // self.attention.gpus_per_node) + (rank - a) // self.experts.gpus_per_node

    def node_span(self, rank: int) -> range:
        a, ga, ge = self.bound_ranks, self.attention.gpus_per_node, self.experts.gpus_per_node
        if rank < a:
            start = rank // ga * ga
            return range(start, min(start + ga, a))
        start = a + (rank - a) // ge * ge
        return range(start, start + ge)

    @property
    def gpus_per_node(self) -> int:
        """Of the attention group: the only one with head-parallel groups that must stay in a node."""
        return self.attention.gpus_per_node

    @property
    def internode_bytes_per_s(self) -> float:
        return min(self.attention.internode_bytes_per_s, self.experts.internode_bytes_per_s)

    @property
    def internode_latency_s(self) -> float:
        return max(self.attention.internode_latency_s, self.experts.internode_latency_s)

    def summary(self) -> str:
        return (f"attention on {self.attention.summary()}\n  experts on {self.experts.summary()}\n  between the groups "
                f"{self.internode_bytes_per_s / 1e9:.0f} GB/s per GPU (the slower side's NIC), on nodes of their own")

    def link_info(self) -> dict:
        return dict(attention=self.attention.link_info(), experts=self.experts.link_info(),
                    between_groups_gb_s_per_gpu=self.internode_bytes_per_s / 1e9,
                    between_groups_latency_us=self.internode_latency_s * 1e6)


def _read_table(path: Path) -> dict:
    text = path.read_text()
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot parse hardware profile ({err})") from err


def profile_from_dict(raw: dict, source: str = "profile") -> Hardware:
    """A profile from a table: optional `base` (a built-in name) plus overriding fields."""
    raw = dict(raw)
    base_name = raw.pop("base", None)
    names = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{source}: unknown hardware field(s) {unknown}; known: {sorted(names)}")
    if base_name is None:
        missing = [f.name for f in dataclasses.fields(Hardware) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise ValueError(f"{source}: fields {missing} are required without `base = \"a100-80g\"` (or h100, h200)")
        return Hardware(**{**raw, "source": raw.get("source", source)})
    base = get_profile(base_name)
    for key in ("op_latency_s", "op_efficiency"):  # merge tables rather than replace them
        if key in raw:
            raw[key] = {**dict(getattr(base, key)), **raw[key]}
    return base.replace(**raw, source=source)


def get_profile(name_or_path: str) -> Hardware:
    """A built-in profile by name, or a TOML/JSON profile file."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"hardware {name_or_path!r}: not a built-in profile ({sorted(PROFILES)}) "
                         "and no such file")
    return profile_from_dict(_read_table(path), source=str(path))


# --- calibration (written by masep.perf.bench.calibrate) ---------------------------------------------
def fit_op(points: list[tuple[float, float]], default_latency: float) -> tuple[float, float]:
    """Least-squares fit of `measured = latency + roofline / efficiency` over (roofline_s, measured_s)
    points. One point (or identical rooflines): keep the default latency, fit the efficiency only.
    Returns (latency_s, efficiency), latency clamped to >= 0."""
    xs = [x for x, _ in points]
    if len(points) >= 2 and max(xs) - min(xs) > 1e-3 * max(xs):
        n = len(points)
        mx, my = sum(xs) / n, sum(y for _, y in points) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx
        lat = my - slope * mx
        if slope > 0 and lat >= 0:
            return lat, 1.0 / slope
    lat = default_latency
    ratio = sum(x for x, _ in points) / max(sum(max(y - lat, 1e-12) for _, y in points), 1e-12)
    return lat, ratio


def apply_calibration(hw: Hardware, doc: dict, source: str = "calibration") -> Hardware:
    """Override the achievable rates with a calibration document's measured copy bandwidth and
    matmul rate, then fit each op kind's (latency, efficiency) from its measurements.

    The copy bandwidth counts bytes read + written, i.e. the rate at which a kernel streams HBM;
    it becomes the achievable HBM rate (efficiency = copy / spec, capped at 1)."""
    for key in ("hbm_copy_bytes_per_s", "matmul_flops_per_s"):
        if not isinstance(doc.get(key), (int, float)) or doc[key] <= 0:
            raise ValueError(f"{source}: field {key!r} must be a positive number, got {doc.get(key)!r}")
    hbm_eff = min(1.0, doc["hbm_copy_bytes_per_s"] / hw.hbm_bytes_per_s)
    mm_eff = min(1.0, doc["matmul_flops_per_s"] / hw.matmul_flops_per_s)
    hw = hw.replace(hbm_efficiency=hbm_eff, matmul_efficiency=mm_eff,
                    source=f"{hw.source} + {source} ({doc.get('device', '?')}, {doc.get('date', '?')})")
    latency, efficiency = dict(hw.op_latency_s), dict(hw.op_efficiency)
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for m in doc.get("measurements", []):
        if m.get("op") not in COMPUTE_KINDS or m.get("measured_ms") is None:
            continue  # `step` rows mix kinds: not used to fit one kind
        roof = max(m["bytes"] / (hw.hbm_bytes_per_s * hbm_eff), m["flops"] / (hw.matmul_flops_per_s * mm_eff))
        by_kind.setdefault(m["op"], []).append((roof, m["measured_ms"] * 1e-3))
    for kind, points in sorted(by_kind.items()):
        latency[kind], efficiency[kind] = fit_op(points, hw.latency(kind))
    return hw.replace(op_latency_s=latency, op_efficiency=efficiency)


def load_hardware(name_or_path: str, calibration: str | None = None, gpus_per_node: int | None = None) -> Hardware:
    hw = get_profile(name_or_path)
    if calibration:
        doc = read_json(calibration, "--calibration")
        hw = apply_calibration(hw, doc, source=str(calibration))
    if gpus_per_node is not None:
        hw = hw.replace(gpus_per_node=gpus_per_node)
    return hw


def ring_allreduce_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2(n-1) steps, each moving nbytes/n per rank."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth


def ring_allgather_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring all-gather of a total of nbytes: n-1 steps."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) * latency + (ranks - 1) / ranks * nbytes / bandwidth

